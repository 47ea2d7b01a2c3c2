# pragma version 0.4.3
# pragma evm-version cancun
# pragma optimize gas
"""
@title gpumarket escrow
@notice Holds a renter's deposit for one GPU rental and settles it on the renter's signed
        usage receipt. No owner, no admin key, no upgrade path, no fee.
@dev    The agreement terms are passed in calldata on every call and re-hashed (EIP-712 struct
        hash = agreement id); storage holds one packed uint256 per agreement:
            bits   0..7    state (0 NONE, 1 OPEN, 2 CLOSED, 3 CLAIMED, 4 DISPUTED, 5 FINAL)
            bits   8..71   end      (unix seconds; provider may claim until end + grace)
            bits  72..135  acked    (claimed acknowledged seconds; CLAIMED / DISPUTED only)
            bits 136..199  since    (claim time in CLAIMED, dispute time in DISPUTED)
        A FINAL agreement keeps its slot non-zero so its id (and the provider's consent
        signature) can never be used again.
        Payouts are pushed at settlement; a push that fails (reverting recipient or token,
        re-entry attempt, out of gas) becomes a credit the recipient withdraws later. A token
        payout counts as paid by the escrow's own balance: whatever the token returns, only what
        actually left the escrow is paid; the rest is credited (specs/escrow.md, tokens).
        Every state-changing function holds the transient-storage re-entrancy lock.
"""

from ethereum.ercs import IERC20

struct Terms:
    provider: address
    renter: address
    token: address
    pricePerSecond: uint256
    maxSeconds: uint64
    heartbeatInterval: uint32
    grace: uint32
    arbiter: address
    disputeWindow: uint32
    detailsHash: bytes32
    openBy: uint64

event Opened:
    agreement_id: indexed(bytes32)
    renter: indexed(address)
    provider: indexed(address)
    token: address
    deposit: uint256
    end: uint256

event Closed:
    agreement_id: indexed(bytes32)
    end: uint256

event Claimed:
    agreement_id: indexed(bytes32)
    acked_seconds: uint256
    provider_amount: uint256
    renter_amount: uint256
    settled: bool

event Disputed:
    agreement_id: indexed(bytes32)
    by: indexed(address)

event Arbitrated:
    agreement_id: indexed(bytes32)
    provider_amount: uint256
    renter_amount: uint256

event Finalized:
    agreement_id: indexed(bytes32)
    acked_seconds: uint256
    provider_amount: uint256
    renter_amount: uint256

event Recovered:
    agreement_id: indexed(bytes32)
    renter_amount: uint256

event Credited:
    agreement_id: indexed(bytes32)
    recipient: indexed(address)
    token: indexed(address)
    amount: uint256

event Withdrawn:
    recipient: indexed(address)
    token: indexed(address)
    to: address
    amount: uint256

# keccak256("Agreement(address provider,address renter,address token,uint256 pricePerSecond,"
#           "uint64 maxSeconds,uint32 heartbeatInterval,uint32 grace,address arbiter,"
#           "uint32 disputeWindow,bytes32 detailsHash,uint64 openBy)")
AGREEMENT_TYPEHASH: constant(bytes32) = keccak256("Agreement(address provider,address renter,address token,uint256 pricePerSecond,uint64 maxSeconds,uint32 heartbeatInterval,uint32 grace,address arbiter,uint32 disputeWindow,bytes32 detailsHash,uint64 openBy)")
RECEIPT_TYPEHASH: constant(bytes32) = keccak256("Receipt(bytes32 agreementId,uint64 ackedSeconds)")
DOMAIN_TYPEHASH: constant(bytes32) = keccak256("EIP712Domain(string name,string version,uint256 chainId,address verifyingContract)")
NAME_HASH: constant(bytes32) = keccak256("gpumarket-escrow")
VERSION_HASH: constant(bytes32) = keccak256("1")

# secp256k1 n / 2: larger s values are the malleated twin of a valid signature.
HALF_N: constant(uint256) = 57896044618658097711785492504343953926418782139537452191302581570759080747168

ST_NONE: constant(uint256) = 0  # never written: an unused id reads as 0
OPEN: constant(uint256) = 1
CLOSED: constant(uint256) = 2
CLAIMED: constant(uint256) = 3
DISPUTED: constant(uint256) = 4
FINAL: constant(uint256) = 5

MASK64: constant(uint256) = 18446744073709551615

# After a dispute the arbiter has this long to rule; afterwards anyone may finalize with the
# claimed (receipt-backed) amounts, so funds are never stuck behind an absent arbiter.
ARBITRATION_TIMEOUT: constant(uint256) = 1209600  # 14 days

# Bounds on the terms (specs/parameters.md says why). grace: long enough for the provider to see
# the end and get its claim mined; short enough that an unclaimed deposit returns within a week.
# disputeWindow: the same reasoning for the party that contests a claim.
MIN_GRACE: constant(uint32) = 300  # 5 minutes
MAX_GRACE: constant(uint32) = 604800  # 7 days
MIN_DISPUTE_WINDOW: constant(uint32) = 300  # 5 minutes
MAX_DISPUTE_WINDOW: constant(uint32) = 604800  # 7 days

# Gas forwarded to a recipient / token on a push payout; a push that fails for any reason
# (including running out of this gas) becomes a credit for withdraw().
NATIVE_PUSH_GAS: constant(uint256) = 100000
TOKEN_PUSH_GAS: constant(uint256) = 300000

agreements: public(HashMap[bytes32, uint256])
credits: public(HashMap[address, HashMap[address, uint256]])  # token -> holder -> amount

_CACHED_CHAIN_ID: immutable(uint256)
_CACHED_SELF: immutable(address)
_CACHED_DOMAIN_SEPARATOR: immutable(bytes32)


@deploy
def __init__():
    _CACHED_CHAIN_ID = chain.id
    _CACHED_SELF = self
    _CACHED_DOMAIN_SEPARATOR = keccak256(
        abi_encode(DOMAIN_TYPEHASH, NAME_HASH, VERSION_HASH, chain.id, self)
    )


# ---------------------------------------------------------------- views

@external
@view
def domainSeparator() -> bytes32:
    return self._domain_separator()


@external
@pure
def agreementId(terms: Terms) -> bytes32:
    return self._agreement_id(terms)


@external
@view
def status(agreement_id: bytes32) -> (uint256, uint256, uint256, uint256):
    """
    @return (state, end, acked_seconds, since) unpacked from the agreement's slot.
    """
    packed: uint256 = self.agreements[agreement_id]
    return (packed & 255, (packed >> 8) & MASK64, (packed >> 72) & MASK64, (packed >> 136) & MASK64)


# ---------------------------------------------------------------- lifecycle

@external
@payable
@nonreentrant
def open(terms: Terms, consent_sig: Bytes[65]):
    assert msg.sender == terms.renter, "only the renter can open"
    assert terms.provider != empty(address), "provider is the zero address"
    assert terms.provider != terms.renter, "provider is the renter"
    assert block.timestamp <= convert(terms.openBy, uint256), "consent expired (open_by passed)"
    assert terms.pricePerSecond != 0, "price_per_second is zero"
    assert terms.maxSeconds != 0, "max_seconds is zero"
    assert terms.grace >= MIN_GRACE and terms.grace <= MAX_GRACE, "grace out of bounds"
    assert (terms.arbiter == empty(address)) == (terms.disputeWindow == 0), "arbiter and dispute_window must be set together"
    if terms.arbiter != empty(address):
        # An arbiter who is a party could claim, dispute its own claim and award itself the deposit.
        assert terms.arbiter != terms.provider and terms.arbiter != terms.renter, "arbiter is a party"
        assert terms.disputeWindow >= MIN_DISPUTE_WINDOW and terms.disputeWindow <= MAX_DISPUTE_WINDOW, "dispute_window out of bounds"
    assert terms.pricePerSecond <= max_value(uint256) // convert(terms.maxSeconds, uint256), "deposit overflows"
    agreement_id: bytes32 = self._agreement_id(terms)
    assert self.agreements[agreement_id] == 0, "agreement id already used"
    end: uint256 = block.timestamp + convert(terms.maxSeconds, uint256)
    assert end <= MASK64, "end time overflows uint64"
    assert self._recover(self._digest(agreement_id), consent_sig) == terms.provider, "consent not signed by provider"

    deposit: uint256 = terms.pricePerSecond * convert(terms.maxSeconds, uint256)
    if terms.token == empty(address):
        assert msg.value == deposit, "msg.value must equal the deposit"
    else:
        assert msg.value == 0, "msg.value must be zero for a token deposit"
        assert terms.token.is_contract, "token has no code"
        before: uint256 = staticcall IERC20(terms.token).balanceOf(self)
        ok: bool = False
        resp: Bytes[32] = b""
        ok, resp = raw_call(
            terms.token,
            abi_encode(msg.sender, self, deposit, method_id=method_id("transferFrom(address,address,uint256)")),
            max_outsize=32,
            revert_on_failure=False,
        )
        assert ok and self._returned_true(resp), "token transferFrom failed"
        after: uint256 = staticcall IERC20(terms.token).balanceOf(self)
        assert after >= before and after - before == deposit, "token delivered less than the deposit"

    self.agreements[agreement_id] = OPEN | (end << 8)
    log Opened(agreement_id=agreement_id, renter=terms.renter, provider=terms.provider, token=terms.token, deposit=deposit, end=end)


@external
@nonreentrant
def close(terms: Terms):
    """
    @notice The renter ends the rental early: end := now. The provider may still claim for
            `grace` seconds after the new end.
    """
    assert msg.sender == terms.renter, "only the renter can close"
    agreement_id: bytes32 = self._agreement_id(terms)
    packed: uint256 = self.agreements[agreement_id]
    assert packed & 255 == OPEN, "agreement is not open"
    assert block.timestamp < (packed >> 8) & MASK64, "agreement already ended"
    self.agreements[agreement_id] = CLOSED | (block.timestamp << 8)
    log Closed(agreement_id=agreement_id, end=block.timestamp)


@external
@nonreentrant
def claim(terms: Terms, acked_seconds: uint64, receipt_sig: Bytes[65]):
    """
    @notice The provider settles on the renter's receipt for `acked_seconds` (cumulative).
            Without an arbiter this pays out at once; with one it starts the dispute window.
    """
    assert msg.sender == terms.provider, "only the provider can claim"
    agreement_id: bytes32 = self._agreement_id(terms)
    packed: uint256 = self.agreements[agreement_id]
    state: uint256 = packed & 255
    assert state == OPEN or state == CLOSED, "agreement is not open"
    assert block.timestamp <= ((packed >> 8) & MASK64) + convert(terms.grace, uint256), "claim period is over"
    assert acked_seconds <= terms.maxSeconds, "acked_seconds exceeds max_seconds"
    receipt_hash: bytes32 = keccak256(abi_encode(RECEIPT_TYPEHASH, agreement_id, acked_seconds))
    assert self._recover(self._digest(receipt_hash), receipt_sig) == terms.renter, "receipt not signed by renter"

    deposit: uint256 = terms.pricePerSecond * convert(terms.maxSeconds, uint256)
    provider_amount: uint256 = terms.pricePerSecond * convert(acked_seconds, uint256)
    renter_amount: uint256 = deposit - provider_amount
    if terms.arbiter == empty(address):
        self.agreements[agreement_id] = FINAL
        log Claimed(agreement_id=agreement_id, acked_seconds=convert(acked_seconds, uint256), provider_amount=provider_amount, renter_amount=renter_amount, settled=True)
        self._pay_both(agreement_id, terms, provider_amount, renter_amount)
    else:
        self.agreements[agreement_id] = CLAIMED | (packed & (MASK64 << 8)) | (convert(acked_seconds, uint256) << 72) | (block.timestamp << 136)
        log Claimed(agreement_id=agreement_id, acked_seconds=convert(acked_seconds, uint256), provider_amount=provider_amount, renter_amount=renter_amount, settled=False)


@external
@nonreentrant
def dispute(terms: Terms):
    """
    @notice Either party contests a claim within `disputeWindow` seconds of it.
    """
    assert msg.sender == terms.provider or msg.sender == terms.renter, "only a party can dispute"
    agreement_id: bytes32 = self._agreement_id(terms)
    packed: uint256 = self.agreements[agreement_id]
    assert packed & 255 == CLAIMED, "agreement is not claimed"
    assert block.timestamp <= ((packed >> 136) & MASK64) + convert(terms.disputeWindow, uint256), "dispute window is over"
    self.agreements[agreement_id] = DISPUTED | (packed & (MASK64 << 8)) | (packed & (MASK64 << 72)) | (block.timestamp << 136)
    log Disputed(agreement_id=agreement_id, by=msg.sender)


@external
@nonreentrant
def arbitrate(terms: Terms, provider_amount: uint256):
    """
    @notice The arbiter splits the deposit of a disputed agreement: provider_amount to the
            provider, the rest to the renter. Allowed for ARBITRATION_TIMEOUT after the dispute.
    """
    assert msg.sender == terms.arbiter, "only the arbiter can arbitrate"
    agreement_id: bytes32 = self._agreement_id(terms)
    packed: uint256 = self.agreements[agreement_id]
    assert packed & 255 == DISPUTED, "agreement is not disputed"
    assert block.timestamp <= ((packed >> 136) & MASK64) + ARBITRATION_TIMEOUT, "arbitration period is over"
    deposit: uint256 = terms.pricePerSecond * convert(terms.maxSeconds, uint256)
    assert provider_amount <= deposit, "provider_amount exceeds the deposit"
    renter_amount: uint256 = deposit - provider_amount
    self.agreements[agreement_id] = FINAL
    log Arbitrated(agreement_id=agreement_id, provider_amount=provider_amount, renter_amount=renter_amount)
    self._pay_both(agreement_id, terms, provider_amount, renter_amount)


@external
@nonreentrant
def finalize(terms: Terms):
    """
    @notice Anyone pays out the claimed amounts once the dispute window passed without a
            dispute, or once the arbiter let ARBITRATION_TIMEOUT pass after a dispute.
    """
    agreement_id: bytes32 = self._agreement_id(terms)
    packed: uint256 = self.agreements[agreement_id]
    state: uint256 = packed & 255
    since: uint256 = (packed >> 136) & MASK64
    if state == CLAIMED:
        assert block.timestamp > since + convert(terms.disputeWindow, uint256), "dispute window not over"
    elif state == DISPUTED:
        assert block.timestamp > since + ARBITRATION_TIMEOUT, "arbitration period not over"
    else:
        raise "agreement is not claimed or disputed"
    acked: uint256 = (packed >> 72) & MASK64
    deposit: uint256 = terms.pricePerSecond * convert(terms.maxSeconds, uint256)
    provider_amount: uint256 = terms.pricePerSecond * acked
    renter_amount: uint256 = deposit - provider_amount
    self.agreements[agreement_id] = FINAL
    log Finalized(agreement_id=agreement_id, acked_seconds=acked, provider_amount=provider_amount, renter_amount=renter_amount)
    self._pay_both(agreement_id, terms, provider_amount, renter_amount)


@external
@nonreentrant
def recover(terms: Terms):
    """
    @notice Anyone returns the whole deposit to the renter once end + grace passed unclaimed.
    """
    agreement_id: bytes32 = self._agreement_id(terms)
    packed: uint256 = self.agreements[agreement_id]
    state: uint256 = packed & 255
    assert state == OPEN or state == CLOSED, "agreement is not open"
    assert block.timestamp > ((packed >> 8) & MASK64) + convert(terms.grace, uint256), "claim period not over"
    deposit: uint256 = terms.pricePerSecond * convert(terms.maxSeconds, uint256)
    self.agreements[agreement_id] = FINAL
    log Recovered(agreement_id=agreement_id, renter_amount=deposit)
    if terms.token == empty(address):
        self._push_native(agreement_id, terms.renter, deposit)
    else:
        self._push_token(agreement_id, terms.token, terms.renter, deposit, staticcall IERC20(terms.token).balanceOf(self))


@external
@nonreentrant
def withdraw(token: address):
    """
    @notice Pay out the caller's credit in `token` (zero address: native coin) to the caller.
    """
    self._withdraw(token, msg.sender)


@external
@nonreentrant
def withdrawTo(token: address, to: address):
    """
    @notice Pay out the caller's credit in `token` to `to` (for a caller that cannot receive).
    """
    assert to != empty(address), "to is the zero address"
    assert to != self, "to is the escrow"
    self._withdraw(token, to)


# ---------------------------------------------------------------- internals

@internal
def _withdraw(token: address, to: address):
    amount: uint256 = self.credits[token][msg.sender]
    assert amount != 0, "nothing to withdraw"
    self.credits[token][msg.sender] = 0
    log Withdrawn(recipient=msg.sender, token=token, to=to, amount=amount)
    if token == empty(address):
        assert raw_call(to, b"", value=amount, revert_on_failure=False), "native transfer failed"
    else:
        # Paid means: exactly `amount` left the escrow (whatever the token returns). Otherwise
        # revert, and the credit stays for a later try.
        before: uint256 = staticcall IERC20(token).balanceOf(self)
        ok: bool = raw_call(
            token,
            abi_encode(to, amount, method_id=method_id("transfer(address,uint256)")),
            revert_on_failure=False,
        )
        after: uint256 = staticcall IERC20(token).balanceOf(self)
        assert ok and after <= before and before - after == amount, "token transfer failed"


@internal
def _pay_both(agreement_id: bytes32, terms: Terms, provider_amount: uint256, renter_amount: uint256):
    if terms.token == empty(address):
        self._push_native(agreement_id, terms.provider, provider_amount)
        self._push_native(agreement_id, terms.renter, renter_amount)
    else:
        # One balance read before and one after each push (the read after the first push is
        # the read before the second).
        balance: uint256 = staticcall IERC20(terms.token).balanceOf(self)
        balance = self._push_token(agreement_id, terms.token, terms.provider, provider_amount, balance)
        self._push_token(agreement_id, terms.token, terms.renter, renter_amount, balance)


@internal
def _push_native(agreement_id: bytes32, to: address, amount: uint256):
    if amount == 0:
        return
    if not raw_call(to, b"", value=amount, gas=NATIVE_PUSH_GAS, revert_on_failure=False):
        self._credit(agreement_id, empty(address), to, amount)


@internal
def _push_token(agreement_id: bytes32, token: address, to: address, amount: uint256, before: uint256) -> uint256:
    """
    @dev Push `amount` of `token` to `to`; `before` is the escrow's balance now. What left the
         escrow's balance is what was paid, whatever the call returned (a token may move funds
         and return false, or return true and move nothing); the unpaid rest becomes a credit.
         A token that takes more than `amount` would be spending other agreements' deposits:
         the settlement reverts. Returns the escrow's balance after the push.
    """
    if amount == 0:
        return before
    # `ok` is deliberately unused: a revert shows as nothing sent, a lie in either direction
    # is caught by the balance.
    ok: bool = raw_call(
        token,
        abi_encode(to, amount, method_id=method_id("transfer(address,uint256)")),
        gas=TOKEN_PUSH_GAS,
        revert_on_failure=False,
    )
    after: uint256 = staticcall IERC20(token).balanceOf(self)
    sent: uint256 = 0
    if after < before:
        sent = before - after
    assert sent <= amount, "token took more than the payout"
    if sent < amount:
        self._credit(agreement_id, token, to, amount - sent)
    return after


@internal
def _credit(agreement_id: bytes32, token: address, to: address, amount: uint256):
    self.credits[token][to] += amount
    log Credited(agreement_id=agreement_id, recipient=to, token=token, amount=amount)


@internal
@pure
def _returned_true(resp: Bytes[32]) -> bool:
    # transferFrom at open: no return value (USDT-style) or a word equal to 1. (The balance
    # check after it decides what arrived.)
    if len(resp) == 0:
        return True
    if len(resp) < 32:
        return False
    return convert(resp, uint256) == 1


@internal
@view
def _domain_separator() -> bytes32:
    # Both re-checked: a chain split changes chain.id, a DELEGATECALL from another contract
    # changes self (its consents must not verify against this deployment's domain).
    if chain.id == _CACHED_CHAIN_ID and self == _CACHED_SELF:
        return _CACHED_DOMAIN_SEPARATOR
    return keccak256(abi_encode(DOMAIN_TYPEHASH, NAME_HASH, VERSION_HASH, chain.id, self))


@internal
@view
def _digest(struct_hash: bytes32) -> bytes32:
    return keccak256(concat(b"\x19\x01", self._domain_separator(), struct_hash))


@internal
@pure
def _agreement_id(terms: Terms) -> bytes32:
    return keccak256(abi_encode(
        AGREEMENT_TYPEHASH, terms.provider, terms.renter, terms.token, terms.pricePerSecond,
        terms.maxSeconds, terms.heartbeatInterval, terms.grace, terms.arbiter,
        terms.disputeWindow, terms.detailsHash, terms.openBy,
    ))


@internal
@pure
def _recover(digest: bytes32, sig: Bytes[65]) -> address:
    """
    @dev Returns the signer of `digest`, or reverts on a malformed, high-s or unrecoverable
         signature. sig is r || s || v with v in {27, 28}.
    """
    assert len(sig) == 65, "signature must be 65 bytes"
    r: uint256 = convert(extract32(sig, 0), uint256)
    s: uint256 = convert(extract32(sig, 32), uint256)
    v: uint256 = convert(slice(sig, 64, 1), uint256)
    assert v == 27 or v == 28, "signature v must be 27 or 28"
    assert r != 0 and s != 0, "signature r or s is zero"
    assert s <= HALF_N, "signature s is in the upper half (malleable)"
    signer: address = ecrecover(digest, v, r, s)
    assert signer != empty(address), "signature does not recover"
    return signer
