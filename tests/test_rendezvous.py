"""RendezvousBook: the prefill side's answers to decode workers that asked early."""

from __future__ import annotations

from pd.prefill.rendezvous import Outcome, RendezvousBook


def test_unknown_until_fulfilled():
    book = RendezvousBook(memory_s=60)
    assert book.outcome("r") is None
    assert book.fulfil("r", "req-1", [4, 5], now=0)
    assert book.outcome("r") == Outcome("req-1", (4, 5))


def test_failure_is_an_answer():
    book = RendezvousBook(memory_s=60)
    book.fail("r", "aborted", now=0)
    assert book.outcome("r") == Outcome(error="aborted")


def test_cancel_before_the_grant_makes_the_grant_release():
    book = RendezvousBook(memory_s=60)
    assert book.cancel("r", now=0) is None
    assert book.is_cancelled("r")
    assert not book.fulfil("r", "req-1", [1], now=1)  # the caller releases the lease
    assert book.outcome("r") is None and not book.is_cancelled("r")


def test_cancel_after_the_grant_names_the_lease():
    book = RendezvousBook(memory_s=60)
    book.fulfil("r", "req-1", [1], now=0)
    assert book.cancel("r", now=1) == "req-1"
    assert book.outcome("r") is None


def test_old_entries_are_forgotten():
    book = RendezvousBook(memory_s=10)
    book.fulfil("old", "req-1", [1], now=0)
    book.cancel("gone", now=0)
    book.fulfil("new", "req-2", [2], now=8)
    book.forget_old(now=10)
    assert book.outcome("old") is None and not book.is_cancelled("gone")
    assert book.outcome("new") is not None
