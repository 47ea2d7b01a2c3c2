# pragma version 0.4.3
# pragma evm-version cancun
"""
@notice Test-only: runs the escrow's domainSeparator() by DELEGATECALL, i.e. with this
        contract as `self`. The separator must then name this contract, not the escrow.
"""

target: public(address)


@deploy
def __init__(target: address):
    self.target = target


@external
def domainSeparator() -> bytes32:
    resp: Bytes[32] = raw_call(
        self.target, method_id("domainSeparator()"), max_outsize=32, is_delegate_call=True
    )
    return convert(resp, bytes32)
