"""The lowest layer: helpers every other layer may use (no yoso imports above this one).

- ``atomic``         files written whole or not at all (temp name, then rename)
- ``library_noise``  library notices that say nothing to a user, filtered by their exact text
- ``model_configs``  models' configs read without their weights (what the preflight checks)
- ``precision``      the frozen weights' dtype and placement; D's own fp16 gradient scaler; fp16 refused without a GPU
"""
