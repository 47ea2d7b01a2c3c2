# pragma version 0.4.3
# pragma evm-version cancun
"""
@notice Test-only: a token with a blocklist (like USDC's): transfers to a blocked address
        revert, or, with `return_false` set, return false without moving anything.
"""

balanceOf: public(HashMap[address, uint256])
allowance: public(HashMap[address, HashMap[address, uint256]])
blocked: public(HashMap[address, bool])
return_false: public(bool)


@external
def mint(to: address, amount: uint256):
    self.balanceOf[to] += amount


@external
def approve(spender: address, amount: uint256) -> bool:
    self.allowance[msg.sender][spender] = amount
    return True


@external
def set_blocked(who: address, flag: bool):
    self.blocked[who] = flag


@external
def set_return_false(flag: bool):
    self.return_false = flag


@internal
def _move(owner: address, to: address, amount: uint256) -> bool:
    if self.blocked[to]:
        if self.return_false:
            return False
        raise "blocked recipient"
    self.balanceOf[owner] -= amount
    self.balanceOf[to] += amount
    return True


@external
def transfer(to: address, amount: uint256) -> bool:
    return self._move(msg.sender, to, amount)


@external
def transferFrom(owner: address, to: address, amount: uint256) -> bool:
    self.allowance[owner][msg.sender] -= amount
    return self._move(owner, to, amount)
