"""Built-in tasks that follow the `model.py` contract, so lowmem runs without a user file."""

EXAMPLES = {"shakespeare": "lowmem.examples.shakespeare", "binary": "lowmem.examples.binary"}
