"""What a run writes for users and publishes.

- ``final_save``    the final save: LoRA(s), kohya copies, latent statistics, model card
- ``output_files``  the output files users take away, and their names on the Hub
- ``output_dir``    output folders created only once there is something to write
- ``kohya``         the LoRA in kohya format (AUTOMATIC1111, ComfyUI), with the trained alpha
- ``model_card``    ``--output_dir/README.md`` in the Hub's model-card format
- ``hub``           the upload to the Hub
"""
