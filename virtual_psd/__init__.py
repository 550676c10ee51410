"""Virtual PSD: a GlobalPlatform card emulator for tests and demos."""
