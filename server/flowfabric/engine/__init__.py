"""The engine: scheduler, scanners and event fan-out that run inside the server process."""
