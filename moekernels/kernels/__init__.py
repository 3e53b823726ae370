"""@triton.jit code only: no allocation, no launching (that is the launchers' job)."""
