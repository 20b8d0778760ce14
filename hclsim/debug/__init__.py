"""The debugger core (`hclsim step`, the gdb remote stub): hclsim.debug.target.DebugTarget."""

__all__ = ["DebugTarget", "DebugError", "StopEvent"]


def __getattr__(name):
    # Lazy: the debugger pulls in the engine (Unicorn, numba); the protocol modules do not need it.
    if name in __all__:
        from hclsim.debug import target
        return getattr(target, name)
    raise AttributeError(name)
