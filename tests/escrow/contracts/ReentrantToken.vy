# pragma version 0.4.3
# pragma evm-version cancun
"""
@notice Test-only: a token that, inside transfer/transferFrom, calls back into a target (the
        escrow) with attacker-chosen calldata, records whether that re-entry succeeded, and
        then completes the transfer normally.
"""

balanceOf: public(HashMap[address, uint256])
allowance: public(HashMap[address, HashMap[address, uint256]])
target: public(address)
payload: public(Bytes[2048])
reentry_attempts: public(uint256)
reentry_successes: public(uint256)


@external
def mint(to: address, amount: uint256):
    self.balanceOf[to] += amount


@external
def approve(spender: address, amount: uint256) -> bool:
    self.allowance[msg.sender][spender] = amount
    return True


@external
def arm(target: address, payload: Bytes[2048]):
    self.target = target
    self.payload = payload


@internal
def _attack():
    if self.target != empty(address):
        self.reentry_attempts += 1
        if raw_call(self.target, self.payload, revert_on_failure=False):
            self.reentry_successes += 1


@external
def transfer(to: address, amount: uint256) -> bool:
    self._attack()
    self.balanceOf[msg.sender] -= amount
    self.balanceOf[to] += amount
    return True


@external
def transferFrom(owner: address, to: address, amount: uint256) -> bool:
    self._attack()
    self.allowance[owner][msg.sender] -= amount
    self.balanceOf[owner] -= amount
    self.balanceOf[to] += amount
    return True
