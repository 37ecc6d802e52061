"""Stand-ins for external dependencies and synthetic inputs, shared by the tests."""
