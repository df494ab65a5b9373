"""The local stack: gateway emulator, consumer scheduler and embedded services."""
