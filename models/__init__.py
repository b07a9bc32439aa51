"""Networks and the math of TLCM: pure functions and modules, no file or network I/O."""
