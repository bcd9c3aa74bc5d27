"""The model folders. Each one is self-contained: its files are what gets copied to the Hub as remote code."""
