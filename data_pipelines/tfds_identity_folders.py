"""Optional: a tensorflow-datasets builder for the reconfig identity-folder layout.

Needs the `tfds` extra (tensorflow-datasets + tensorflow-cpu, ~1.6 GB); nothing else in the
project imports TensorFlow. This module imports without it; `identity_folders_builder()`
raises a clear ImportError when it is missing.

    pip install -e ".[tfds]"
    python -c "
    from data_pipelines.tfds_identity_folders import identity_folders_builder
    builder = identity_folders_builder()(data_dir='~/tfds', config='default')
    builder.download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir='IDENTITIES'))"

Layout of `manual_dir`: `<identity>/<image>` (see dynamicid_jax/data/inputs.py). Each
example: the image, its identity, source ("multi" | "kdef") and face prompt when one is
known (sidecar, face_prompts.jsonl or KDEF name; empty otherwise: the automatic prompt
needs face analysis, which the precompute job does). The precomputed TFRecord shards of
`data_pipelines/precompute.py` stay the training input; this builder is for users who keep
raw data in TFDS.

Checked once by hand with tensorflow-cpu 2.21 and tensorflow-datasets 4.9.10 (two identity
folders, four photos: built, read back with identities and image shapes); CI has no
TensorFlow and tests only the import guard.
"""

from __future__ import annotations

import pathlib


def identity_folders_builder():
    """The `IdentityFolders` tfds builder class (imports tensorflow_datasets on call)."""
    try:
        import tensorflow_datasets as tfds
    except ImportError as e:
        raise ImportError(
            "tensorflow-datasets (and tensorflow) are not installed: pip install -e '.[tfds]'"
        ) from e

    from dynamicid_jax.data import inputs

    class IdentityFolders(tfds.core.GeneratorBasedBuilder):
        """Face images grouped by identity folder, for DynamicID's reconfiguration stage."""

        VERSION = tfds.core.Version("1.0.0")
        MANUAL_DOWNLOAD_INSTRUCTIONS = "Place one sub-folder of images per identity in manual_dir."

        def _info(self):
            return self.dataset_info_from_configs(
                features=tfds.features.FeaturesDict({
                    "image": tfds.features.Image(shape=(None, None, 3)),
                    "key": tfds.features.Text(),
                    "identity": tfds.features.Text(),
                    "source": tfds.features.Text(),
                    "face_prompt": tfds.features.Text(),
                }),
                supervised_keys=None,
            )

        def _split_generators(self, dl_manager):
            return {"train": self._generate_examples(pathlib.Path(dl_manager.manual_dir))}

        def _generate_examples(self, folder: pathlib.Path):
            for _, items in inputs.find_identity_inputs(folder):
                for item in items:
                    yield item.key, {
                        "image": str(folder / item.key),
                        "key": item.key,
                        "identity": item.identity,
                        "source": item.source,
                        "face_prompt": item.face_prompt or "",
                    }

    return IdentityFolders
