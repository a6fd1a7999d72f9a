"""The step engine every optimizer composes: plans, device flags, the guard, the updates."""
