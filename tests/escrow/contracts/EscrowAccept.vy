# pragma version 0.4.3
# pragma evm-version cancun
# pragma optimize gas
"""
@notice THROWAWAY variant for the gas benchmark only: provider consent by a separate `accept`
        transaction instead of an EIP-712 signature checked in `open`. Same storage layout
        and the same native-coin `open` checks as node/contracts/Escrow.vy otherwise.
"""

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

event Accepted:
    agreement_id: indexed(bytes32)

event Opened:
    agreement_id: indexed(bytes32)
    renter: indexed(address)
    provider: indexed(address)
    token: address
    deposit: uint256
    end: uint256

AGREEMENT_TYPEHASH: constant(bytes32) = keccak256("Agreement(address provider,address renter,address token,uint256 pricePerSecond,uint64 maxSeconds,uint32 heartbeatInterval,uint32 grace,address arbiter,uint32 disputeWindow,bytes32 detailsHash,uint64 openBy)")
ACCEPTED: constant(uint256) = 6
OPEN: constant(uint256) = 1
MASK64: constant(uint256) = 18446744073709551615

agreements: public(HashMap[bytes32, uint256])


@external
@nonreentrant
def accept(terms: Terms):
    assert msg.sender == terms.provider, "only the provider can accept"
    agreement_id: bytes32 = self._agreement_id(terms)
    assert self.agreements[agreement_id] == 0, "agreement id already used"
    self.agreements[agreement_id] = ACCEPTED
    log Accepted(agreement_id=agreement_id)


@external
@payable
@nonreentrant
def open(terms: Terms):
    assert msg.sender == terms.renter, "only the renter can open"
    assert terms.provider != empty(address), "provider is the zero address"
    assert terms.provider != terms.renter, "provider is the renter"
    assert terms.pricePerSecond != 0, "price_per_second is zero"
    assert terms.maxSeconds != 0, "max_seconds is zero"
    assert (terms.arbiter == empty(address)) == (terms.disputeWindow == 0), "arbiter and dispute_window must be set together"
    assert terms.pricePerSecond <= max_value(uint256) // convert(terms.maxSeconds, uint256), "deposit overflows"
    agreement_id: bytes32 = self._agreement_id(terms)
    assert self.agreements[agreement_id] == ACCEPTED, "provider has not accepted"
    end: uint256 = block.timestamp + convert(terms.maxSeconds, uint256)
    assert end <= MASK64, "end time overflows uint64"
    deposit: uint256 = terms.pricePerSecond * convert(terms.maxSeconds, uint256)
    assert terms.token == empty(address), "variant measures native coin only"
    assert msg.value == deposit, "msg.value must equal the deposit"
    self.agreements[agreement_id] = OPEN | (end << 8)
    log Opened(agreement_id=agreement_id, renter=terms.renter, provider=terms.provider, token=terms.token, deposit=deposit, end=end)


@internal
@pure
def _agreement_id(terms: Terms) -> bytes32:
    return keccak256(abi_encode(
        AGREEMENT_TYPEHASH, terms.provider, terms.renter, terms.token, terms.pricePerSecond,
        terms.maxSeconds, terms.heartbeatInterval, terms.grace, terms.arbiter,
        terms.disputeWindow, terms.detailsHash, terms.openBy,
    ))
