"""One module per command: its options, the one service it calls, and what it prints. common.py holds the shared
options, consoles and one-line errors; progress.py the progress bars (drawn on a terminal only)."""
