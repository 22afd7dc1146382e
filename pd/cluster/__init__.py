"""A P/D cluster on Ray: configuration, plan, instance actors, start-up and shutdown."""
