"""`python -m lstm_core.cpu`: build the kernel now (`make` does at setup), so nobody waits for it later."""
from . import available, kernel

print("CPU kernel:", "built" if available() else f"not available ({kernel.error()})")
