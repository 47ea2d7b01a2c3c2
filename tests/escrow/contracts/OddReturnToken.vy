# pragma version 0.4.3
# pragma evm-version cancun
"""
@notice Test-only: transfer MOVES the funds but returns one 32-byte word `ret_word` (0 = false,
        or 2: neither true nor false). transferFrom behaves (returns true), so deposits work.
"""

balanceOf: public(HashMap[address, uint256])
allowance: public(HashMap[address, HashMap[address, uint256]])
ret_word: public(uint256)


@deploy
def __init__(ret_word: uint256):
    self.ret_word = ret_word


@external
def mint(to: address, amount: uint256):
    self.balanceOf[to] += amount


@external
def approve(spender: address, amount: uint256) -> bool:
    self.allowance[msg.sender][spender] = amount
    return True


@external
def transfer(to: address, amount: uint256) -> uint256:
    self.balanceOf[msg.sender] -= amount
    self.balanceOf[to] += amount
    return self.ret_word


@external
def transferFrom(owner: address, to: address, amount: uint256) -> bool:
    self.allowance[owner][msg.sender] -= amount
    self.balanceOf[owner] -= amount
    self.balanceOf[to] += amount
    return True
