"""Training data: precomputed feature shards (TFRecord) and the grain input pipeline.

records.py (format), shards.py (files, manifest), inputs.py (raw folders), face_prompts.py
(KDEF prompts), precompute.py (the jobs), extractors.py (real models), pipeline.py (reading).
"""
