"""Stateful fuzzing of the escrow against a Python model of the specified lifecycle.

Random sequences of open / claim / close / recover / dispute / arbitrate / finalize / withdraw,
blocklisting a recipient on the token (so pushes fail and become credits) and time jumps, with
random (often unauthorised) senders. Every call's outcome, revert reason included, must match
the model; after every step funds are conserved:
    escrow balance == outstanding deposits + outstanding credits   (per token)
    what left the escrow <= what entered it
and every wallet holds exactly what the model says it should.
"""

from __future__ import annotations

import boa
from eth_utils import keccak
from hypothesis import event, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine, initialize, invariant, precondition, rule,
)

from protocol.agreement import AgreementTerms
from protocol.eth import ZERO_ADDRESS

from .helpers import (
    ADDR, ARBITRATION_TIMEOUT, MIN_DISPUTE_WINDOW, MIN_GRACE, ZERO, consent, deploy_escrow, deploy_hostile, fund, hexaddr,
    make_terms, receipt, tup, unchecked,
)

OPEN, CLOSED, CLAIMED, DISPUTED, FINAL = 1, 2, 3, 4, 5
LIVE = (OPEN, CLOSED, CLAIMED, DISPUTED)
PEOPLE = ["provider", "renter", "arbiter", "outsider", "provider2", "renter2"]
person = st.sampled_from(PEOPLE)
index = st.integers(0, 1_000)
# Three times in four the authorised party calls; otherwise a random (often unauthorised) wallet.
sender_choice = st.one_of(st.none(), st.none(), st.none(), person)


# Deployed once at import, outside any anchor (boa's pytest plugin anchors each test and each
# Hypothesis example, which would roll back a deployment made inside one).
_DEPLOYED = (deploy_escrow(), deploy_hostile("RevertingToken"))


class Agreement:
    def __init__(self, terms: AgreementTerms, end: int) -> None:
        self.terms = terms
        self.state = OPEN
        self.end = end
        self.acked = 0
        self.since = 0


class EscrowMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.escrow, self.token = _DEPLOYED
        self._anchor = boa.env.anchor()
        self._anchor.__enter__()
        fund(10**30)
        self.tok = bytes.fromhex(str(self.token.address)[2:])
        self.agreements: list[Agreement] = []
        self.blocked: set[bytes] = set()
        self.credits: dict[tuple[bytes, bytes], int] = {}
        self.entered = {ZERO_ADDRESS: 0, self.tok: 0}
        self.left = {ZERO_ADDRESS: 0, self.tok: 0}
        self.wallet = {(tk, ADDR[p]): self._balance(tk, ADDR[p])
                       for tk in (ZERO_ADDRESS, self.tok) for p in PEOPLE}
        self.salt = 0

    def teardown(self) -> None:
        self._anchor.__exit__(None, None, None)

    # ---------------------------------------------------------------- helpers
    def _balance(self, tk: bytes, who: bytes) -> int:
        if tk == ZERO_ADDRESS:
            return boa.env.get_balance(hexaddr(who))
        return self.token.balanceOf(hexaddr(who))

    def now(self) -> int:
        return boa.env.evm.patch.timestamp

    def pick(self, i: int) -> Agreement:
        return self.agreements[i % len(self.agreements)]

    def pay(self, tk: bytes, to: bytes, amount: int) -> None:
        if amount == 0:
            return
        if tk != ZERO_ADDRESS and to in self.blocked:
            self.credits[(tk, to)] = self.credits.get((tk, to), 0) + amount
        else:
            self.wallet[(tk, to)] += amount
            self.left[tk] += amount

    def who(self, choice: str | None, party: bytes) -> str:
        if choice is not None:
            return choice
        return next(name for name in PEOPLE if ADDR[name] == party)

    def call(self, sender: str, reason: str | None, fn, *args) -> bool:
        event(f"{fn.func_t.name}: {reason or 'ok'}")  # see --hypothesis-show-statistics
        with boa.env.prank(hexaddr(ADDR[sender])):
            if reason is None:
                fn(*args)
                return True
            with boa.reverts(reason):
                fn(*args)
            return False

    # ---------------------------------------------------------------- rules
    @initialize(use_token=st.booleans(), blocked=st.sampled_from([None, *PEOPLE]))
    def first(self, use_token, blocked):
        # One agreement with an arbiter, one without, so every path is reachable at once; often
        # one wallet starts blocklisted on the token, so pushes fail and credits appear early.
        self.open(use_token, True, 1_000, 3_600, 600, 600, "provider", "renter")
        self.open(not use_token, False, 1_000, 3_600, 600, 0, "provider2", "renter2")
        if blocked is not None:
            self.block(blocked, True)

    @precondition(lambda self: len(self.agreements) < 4)
    @rule(use_token=st.booleans(), arbiter=st.booleans(), price=st.integers(1, 10**6),
          max_seconds=st.integers(1, 7_200), grace=st.integers(MIN_GRACE, 1_200),
          window=st.integers(MIN_DISPUTE_WINDOW, 3_600), p=st.sampled_from(["provider", "provider2"]),
          r=st.sampled_from(["renter", "renter2"]))
    def open(self, use_token, arbiter, price, max_seconds, grace, window, p, r):
        self.salt += 1
        tk = self.tok if use_token else ZERO_ADDRESS
        t = AgreementTerms(
            provider=ADDR[p], renter=ADDR[r], token=tk, price_per_second=price,
            max_seconds=max_seconds, heartbeat_interval=30, grace=grace,
            arbiter=ADDR["arbiter"] if arbiter else ZERO_ADDRESS,
            dispute_window=window if arbiter else 0, details_hash=keccak(b"%d" % self.salt),
            open_by=self.now())  # the last second the consent is good for
        if use_token:
            self.token.mint(hexaddr(t.renter), t.deposit)
            self.wallet[(tk, t.renter)] += t.deposit
            with boa.env.prank(hexaddr(t.renter)):
                self.token.approve(self.escrow.address, t.deposit)
        value = 0 if use_token else t.deposit
        with boa.env.prank(hexaddr(t.renter)):
            self.escrow.open(tup(t), consent(self.escrow, t), value=value)
        self.wallet[(tk, t.renter)] -= t.deposit
        self.entered[tk] += t.deposit
        self.agreements.append(Agreement(t, self.now() + max_seconds))

    @rule(kind=st.sampled_from(["expired", "grace_low", "grace_high", "window_low",
                                "window_high", "arbiter_provider", "arbiter_renter"]),
          late=st.integers(1, 10**6))
    def open_refused(self, kind, late):
        """Terms the escrow must refuse whatever state it is in (issue 12): nothing moves."""
        self.salt += 1
        base = dict(provider=ADDR["provider"], renter=ADDR["renter"], token=ZERO_ADDRESS,
                    price_per_second=1_000, max_seconds=600, heartbeat_interval=30, grace=600,
                    arbiter=ZERO_ADDRESS, dispute_window=0,
                    details_hash=keccak(b"refused %d" % self.salt), open_by=self.now())
        change, reason = {
            "expired": ({"open_by": self.now() - late}, "consent expired (open_by passed)"),
            "grace_low": ({"grace": MIN_GRACE - late % MIN_GRACE - 1}, "grace out of bounds"),
            "grace_high": ({"grace": 604_800 + late}, "grace out of bounds"),
            "window_low": ({"arbiter": ADDR["arbiter"], "dispute_window": late % MIN_DISPUTE_WINDOW or 1},
                           "dispute_window out of bounds"),
            "window_high": ({"arbiter": ADDR["arbiter"], "dispute_window": 604_800 + late},
                            "dispute_window out of bounds"),
            "arbiter_provider": ({"arbiter": ADDR["provider"], "dispute_window": 600}, "arbiter is a party"),
            "arbiter_renter": ({"arbiter": ADDR["renter"], "dispute_window": 600}, "arbiter is a party"),
        }[kind]
        t = unchecked(make_terms(), **{**base, **change})
        with boa.env.prank(hexaddr(t.renter)), boa.reverts(reason):
            self.escrow.open(tup(t), consent(self.escrow, t), value=t.deposit)
        event(f"open: {reason}")

    @precondition(lambda self: self.agreements)
    @rule(i=index, percent=st.integers(0, 110), sender=sender_choice)
    def claim(self, i, percent, sender):
        a = self.pick(i)
        t = a.terms
        sender = self.who(sender, t.provider)
        acked = t.max_seconds * percent // 100
        if ADDR[sender] != t.provider:
            reason = "only the provider can claim"
        elif a.state not in (OPEN, CLOSED):
            reason = "agreement is not open"
        elif self.now() > a.end + t.grace:
            reason = "claim period is over"
        elif acked > t.max_seconds:
            reason = "acked_seconds exceeds max_seconds"
        else:
            reason = None
        if self.call(sender, reason, self.escrow.claim, tup(t), acked,
                     receipt(self.escrow, t, acked)):
            if t.has_arbiter:
                a.state, a.acked, a.since = CLAIMED, acked, self.now()
            else:
                a.state = FINAL
                self.pay(t.token, t.provider, t.price_per_second * acked)
                self.pay(t.token, t.renter, t.deposit - t.price_per_second * acked)

    @precondition(lambda self: self.agreements)
    @rule(i=index, sender=sender_choice)
    def close(self, i, sender):
        a = self.pick(i)
        sender = self.who(sender, a.terms.renter)
        if ADDR[sender] != a.terms.renter:
            reason = "only the renter can close"
        elif a.state != OPEN:
            reason = "agreement is not open"
        elif self.now() >= a.end:
            reason = "agreement already ended"
        else:
            reason = None
        if self.call(sender, reason, self.escrow.close, tup(a.terms)):
            a.state, a.end = CLOSED, self.now()

    @precondition(lambda self: self.agreements)
    @rule(i=index, sender=person)
    def recover(self, i, sender):
        a = self.pick(i)
        if a.state not in (OPEN, CLOSED):
            reason = "agreement is not open"
        elif self.now() <= a.end + a.terms.grace:
            reason = "claim period not over"
        else:
            reason = None
        if self.call(sender, reason, self.escrow.recover, tup(a.terms)):
            a.state = FINAL
            self.pay(a.terms.token, a.terms.renter, a.terms.deposit)

    @precondition(lambda self: self.agreements)
    @rule(i=index, sender=sender_choice, by_provider=st.booleans())
    def dispute(self, i, sender, by_provider):
        a = self.pick(i)
        t = a.terms
        sender = self.who(sender, t.provider if by_provider else t.renter)
        if ADDR[sender] not in (t.provider, t.renter):
            reason = "only a party can dispute"
        elif a.state != CLAIMED:
            reason = "agreement is not claimed"
        elif self.now() > a.since + t.dispute_window:
            reason = "dispute window is over"
        else:
            reason = None
        if self.call(sender, reason, self.escrow.dispute, tup(t)):
            a.state, a.since = DISPUTED, self.now()

    @precondition(lambda self: self.agreements)
    @rule(i=index, sender=sender_choice, percent=st.integers(0, 110))
    def arbitrate(self, i, sender, percent):
        a = self.pick(i)
        t = a.terms
        sender = self.who(sender, ADDR["arbiter"])
        amount = t.deposit * percent // 100
        if ADDR[sender] != t.arbiter:
            reason = "only the arbiter can arbitrate"
        elif a.state != DISPUTED:
            reason = "agreement is not disputed"
        elif self.now() > a.since + ARBITRATION_TIMEOUT:
            reason = "arbitration period is over"
        elif amount > t.deposit:
            reason = "provider_amount exceeds the deposit"
        else:
            reason = None
        if self.call(sender, reason, self.escrow.arbitrate, tup(t), amount):
            a.state = FINAL
            self.pay(t.token, t.provider, amount)
            self.pay(t.token, t.renter, t.deposit - amount)

    @precondition(lambda self: self.agreements)
    @rule(i=index, sender=person)
    def finalize(self, i, sender):
        a = self.pick(i)
        t = a.terms
        if a.state == CLAIMED and self.now() <= a.since + t.dispute_window:
            reason = "dispute window not over"
        elif a.state == DISPUTED and self.now() <= a.since + ARBITRATION_TIMEOUT:
            reason = "arbitration period not over"
        elif a.state not in (CLAIMED, DISPUTED):
            reason = "agreement is not claimed or disputed"
        else:
            reason = None
        if self.call(sender, reason, self.escrow.finalize, tup(t)):
            a.state = FINAL
            self.pay(t.token, t.provider, t.price_per_second * a.acked)
            self.pay(t.token, t.renter, t.deposit - t.price_per_second * a.acked)

    @rule(who=person, flag=st.booleans())
    def block(self, who, flag):
        self.token.set_blocked(hexaddr(ADDR[who]), flag)
        (self.blocked.add if flag else self.blocked.discard)(ADDR[who])

    @rule(who=sender_choice, use_token=st.booleans())
    def withdraw(self, who, use_token):
        tk = self.tok if use_token else ZERO_ADDRESS
        if who is None:  # someone holding a credit, if anyone does
            holders = sorted(w for (k, w) in self.credits if k == tk)
            who = self.who(None, holders[0]) if holders else "outsider"
        me = ADDR[who]
        amount = self.credits.get((tk, me), 0)
        if amount == 0:
            reason = "nothing to withdraw"
        elif tk != ZERO_ADDRESS and me in self.blocked:
            reason = "token transfer failed"
        else:
            reason = None
        if self.call(who, reason, self.escrow.withdraw, hexaddr(tk)):
            del self.credits[(tk, me)]
            self.wallet[(tk, me)] += amount
            self.left[tk] += amount

    @rule(seconds=st.sampled_from([1, 1, 1, 30, 30, 300, 601, 3_600, ARBITRATION_TIMEOUT + 1]))
    def warp(self, seconds):
        boa.env.time_travel(seconds=seconds)

    # ---------------------------------------------------------------- invariants
    # Invariants read contract storage directly (boa's storage introspection) rather than
    # through EVM calls: same values, a fraction of the time. The getters are covered by the
    # unit tests.
    def _token_balances(self) -> dict[bytes, int]:
        return {bytes.fromhex(k[2:]): v for k, v in self.token._storage.balanceOf.get().items()}

    @invariant()
    def funds_are_conserved(self):
        tokens = self._token_balances()
        escrow_addr = bytes.fromhex(str(self.escrow.address)[2:])
        for tk in (ZERO_ADDRESS, self.tok):
            outstanding = sum(a.terms.deposit for a in self.agreements
                              if a.terms.token == tk and a.state in LIVE)
            owed = sum(v for (k, _), v in self.credits.items() if k == tk)
            held = (boa.env.get_balance(hexaddr(escrow_addr)) if tk == ZERO_ADDRESS
                    else tokens.get(escrow_addr, 0))
            assert held == outstanding + owed
            assert self.left[tk] + outstanding + owed == self.entered[tk]
            assert self.left[tk] <= self.entered[tk]

    @invariant()
    def wallets_and_credits_match_model(self):
        tokens = self._token_balances()
        for (tk, who), expected in self.wallet.items():
            actual = (boa.env.get_balance(hexaddr(who)) if tk == ZERO_ADDRESS
                      else tokens.get(who, 0))
            assert actual == expected, (tk, who)
        stored = {
            (bytes.fromhex(tk[2:]), bytes.fromhex(holder[2:])): v
            for tk, holders in self.escrow._storage.credits.get().items()
            for holder, v in holders.items() if v
        }
        assert stored == self.credits

    @invariant()
    def slots_match_model(self):
        stored = self.escrow._storage.agreements.get()
        mask = 2**64 - 1
        for a in self.agreements:
            packed = stored.get(a.terms.agreement_id(), 0)
            st_, end, acked, since = packed & 255, (packed >> 8) & mask, (packed >> 72) & mask, packed >> 136
            assert st_ == a.state
            if a.state in (OPEN, CLOSED):
                assert end == a.end
            if a.state in (CLAIMED, DISPUTED):
                assert (end, acked, since) == (a.end, a.acked, a.since)


EscrowMachine.TestCase.settings = settings(
    max_examples=30, stateful_step_count=40, deadline=None)
TestEscrowStateful = EscrowMachine.TestCase
