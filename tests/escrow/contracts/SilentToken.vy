# pragma version 0.4.3
# pragma evm-version cancun
"""
@notice Test-only: USDT-style (no return values). While `broken`, transfer returns nothing and
        does NOTHING (no revert, no movement), the worst case for a caller that trusts an empty
        return. transferFrom always behaves, so deposits work; set_broken(False) repairs it.
"""

balanceOf: public(HashMap[address, uint256])
allowance: public(HashMap[address, HashMap[address, uint256]])
broken: public(bool)


@external
def mint(to: address, amount: uint256):
    self.balanceOf[to] += amount


@external
def approve(spender: address, amount: uint256):
    self.allowance[msg.sender][spender] = amount


@external
def set_broken(flag: bool):
    self.broken = flag


@external
def transfer(to: address, amount: uint256):
    if self.broken:
        return
    self.balanceOf[msg.sender] -= amount
    self.balanceOf[to] += amount


@external
def transferFrom(owner: address, to: address, amount: uint256):
    self.allowance[owner][msg.sender] -= amount
    self.balanceOf[owner] -= amount
    self.balanceOf[to] += amount
