# pragma version 0.4.3
# pragma evm-version cancun
"""
@notice Test-only: transfer MOVES the funds but returns 64 bytes (two words) instead of one
        bool. transferFrom behaves (returns true), so deposits work.
"""

balanceOf: public(HashMap[address, uint256])
allowance: public(HashMap[address, HashMap[address, uint256]])
first_word: public(uint256)


@deploy
def __init__(first_word: uint256):
    self.first_word = first_word


@external
def mint(to: address, amount: uint256):
    self.balanceOf[to] += amount


@external
def approve(spender: address, amount: uint256) -> bool:
    self.allowance[msg.sender][spender] = amount
    return True


@external
def transfer(to: address, amount: uint256) -> (uint256, uint256):
    self.balanceOf[msg.sender] -= amount
    self.balanceOf[to] += amount
    return (self.first_word, 1)


@external
def transferFrom(owner: address, to: address, amount: uint256) -> bool:
    self.allowance[owner][msg.sender] -= amount
    self.balanceOf[owner] -= amount
    self.balanceOf[to] += amount
    return True
