# pragma version 0.4.3
# pragma evm-version cancun
"""
@notice Test-only: transfer returns true but moves `percent` % of the amount out of the sender
        (0: moves nothing and lies; 50: half; 200: takes twice the amount from the sender).
        transferFrom behaves, so deposits work.
"""

balanceOf: public(HashMap[address, uint256])
allowance: public(HashMap[address, HashMap[address, uint256]])
percent: public(uint256)


@deploy
def __init__(percent: uint256):
    self.percent = percent


@external
def mint(to: address, amount: uint256):
    self.balanceOf[to] += amount


@external
def approve(spender: address, amount: uint256) -> bool:
    self.allowance[msg.sender][spender] = amount
    return True


@external
def set_percent(percent: uint256):
    self.percent = percent


@external
def transfer(to: address, amount: uint256) -> bool:
    moved: uint256 = amount * self.percent // 100
    self.balanceOf[msg.sender] -= moved
    self.balanceOf[to] += moved
    return True


@external
def transferFrom(owner: address, to: address, amount: uint256) -> bool:
    self.allowance[owner][msg.sender] -= amount
    self.balanceOf[owner] -= amount
    self.balanceOf[to] += amount
    return True
