"""Planning: what a run costs before it is launched, on devices we do not have.

`plan` (the estimate, and the real step compiled for compile-only devices), `report` (`mellama plan`'s table and
its search over layouts), `devices` (compile-only GPUs/TPUs/CPUs from `hardware.py`'s table), `cli`.
"""
