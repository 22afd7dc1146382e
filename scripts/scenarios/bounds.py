"""How long the scenarios wait for things: upper bounds ("never hangs"), not speeds."""

# How long a crashed instance may take to come back (a fresh actor and vLLM server,
# on two shared cores), and how long anything else may take to settle.
REJOIN_S = 300
SETTLE_S = 30
# "Never hangs" bounds: how much longer than the configured deadline a request may take
# before it counts as hung. Generous (the two cores are shared, engines can crawl), yet
# far below what a request with no working deadline takes.
PROXY_SLACK_S = 20  # the proxy acts on a deadline (it is never starved for long)
ENGINE_SLACK_S = 60  # an engine must also compute something (recompute a prompt)
CONNECTION_TOLERANCE = 4  # idle keep-alive connections the proxy may hold beyond baseline
