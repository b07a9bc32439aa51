"""TLCM pipeline infrastructure: params, storage, training loop, CLI (the math and networks live in ``models``)."""
