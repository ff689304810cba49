"""DynamicID sampling: reference photos + prompt -> pictures, reproducible from a JSON sidecar.

Per identity (one or more reference photos, averaged):
  photo -> largest face -> identity vector (ArcFace/SFace)  \
  photo -> CLIP preprocess -> vision tower, penultimate      > FaceProjection -> tokens (T, D)
  [face prompt and/or target landmarks given] -> IMR(tokens, source motion, target motion)
Then one jitted loop over a batch of images (of one or many requests, `batching`): each
image's classifier-free guidance pair [negative, positive] kept together, the SAA UNet with
every identity's tokens and boxes, the batch's sampler (`schedulers.SCHEDULERS`: DDIM,
DPM-Solver++ 2M, Euler, Euler ancestral, LCM), VAE decode.

The denoising loop is a `lax.fori_loop` whose trip count is a traced value over timesteps
padded to the training length, so changing `steps`, `guidance`, `alpha`, `beta`, boxes or
prompts, seed or sampler (a traced index, `lax.switch`) reuses the compiled program; only
image size, batch and identity count recompile. `generate` (one request) and
`generate_items` (a batch, optionally over a device mesh) are the same sampler: a request
alone is a batch of its own images.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from dynamicid_jax import base_models, batching, denoising, schedulers
from dynamicid_jax.base_models import TextConditioning
from dynamicid_jax.batching import ImageItem
from dynamicid_jax.modeling import DynamicIDModules, Params
from dynamicid_jax.models import textual_inversion
from dynamicid_jax.models.clip import clip_preprocess_host
from dynamicid_jax.request import IdentityRequest, InputError, SampleRequest, read_image, validate_request

class DynamicIDPipeline:
    """Holds modules, parameters and the face models; `generate` runs one request.

    tokenizer: the family's (`family.load_tokenizer`: SD1.5 one CLIPTokenizer, SDXL a pair).
    faces: a FaceAnalyzer whose embedding size matches `modules.id_dim`; None for modules
    without the identity branch (plain text-to-image). expressions: an ExpressionClassifier, needed
    only to describe a reference face automatically for IMR (else give source_prompt).
    provenance: what the weights are (paths, or "tiny random"), copied to every sidecar.
    """

    def __init__(
        self,
        modules: DynamicIDModules,
        params: Params,
        tokenizer,
        faces,
        expressions=None,
        provenance: Optional[dict] = None,
    ):
        if faces is None and modules.identity_branch:
            raise InputError("DynamicID's identity branch needs face models (--faces)")
        if faces is not None and faces.embedding_dim != modules.id_dim:
            raise InputError(
                f"face model set {faces.name!r} gives {faces.embedding_dim}-d identity vectors but the "
                f"face projection expects {modules.id_dim}-d (use the face models the weights were trained with)"
            )
        self.modules = modules
        self.params = params
        self.tokenizer = tokenizer
        self.faces = faces
        self.expressions = expressions
        self.scheduler = modules.scheduler
        self.provenance = dict(provenance or {})
        self._progress: Optional[Callable[[], None]] = None  # per denoising step, when asked (`generate`)
        self.conditioning = batching.ConditioningCache(self)
        self._faces: dict[str, tuple[Any, tuple[int, int]]] = {}  # photo -> (largest face, (H, W))
        self._reference_tokens: dict[str, jax.Array] = {}  # photo -> projected tokens (T, D)
        self._mesh_params: dict[Any, Params] = {}
        # One program for every text: embedding tokens come in as a per-text table (traced).
        self._encode_text = jax.jit(
            lambda p, ids, extra, skip: modules.family.text_conditioning(modules, p, ids, skip, extra),
            static_argnums=3)
        self._embeddings: dict[str, textual_inversion.TextualInversion] = {}  # file -> embedding
        self._clip_tokens = jax.jit(self._clip_tokens_fn)
        self._project = jax.jit(lambda p, e, c: modules.face_projection.apply({"params": p}, e, c))
        self._landmark_features = jax.jit(lambda v, x: modules.keypoint_encoder.apply(v, x, train=False))
        self._reconfigure = jax.jit(lambda p, *a: modules.imr.apply({"params": p}, *a))

    def complete(self, request: SampleRequest) -> SampleRequest:
        """`request` with a size and a negative prompt: a request built without a size (height
        and width None) gets the base model's native size (`base_models.native_size` of the
        loaded UNet and VAE: SD1.5 512, SDXL 1024), one without a negative prompt (None) the
        family's (`family.default_negative_prompt`: SD1.5 DynamicID's, SDXL none), filled in
        place so that its sidecar records what was drawn. The one place a request's model
        defaults are resolved; every entry that draws a request calls it."""
        if request.height is None and request.width is None:
            request.height, request.width = base_models.native_size(self.modules.unet.config.sample_size,
                                                                    self.modules.vae_scale_factor)
        request.complete_negative_prompt(self.modules.family.default_negative_prompt)
        return request

    # -- identity -------------------------------------------------------------------------

    def _clip_tokens_fn(self, params, pixels):
        """pixels (B, S, S, 3) CLIP-normalised (`clip_preprocess_host`) -> (B, 1 + P, D)."""
        _, _, hidden = self.modules.vision_encoder.apply({"params": params}, pixels)
        return hidden[-2]  # penultimate layer, as IP-Adapter-FaceID-Plus

    def embedding(self, path: str) -> textual_inversion.TextualInversion:
        """A textual-inversion file, read once and checked against the text encoders' widths
        (the family's: one for SD1.5, clip_l + clip_g for SDXL)."""
        if path not in self._embeddings:
            widths = self.modules.family.embedding_widths(self.modules)
            self._embeddings[path] = textual_inversion.read_embedding(path, widths)
        return self._embeddings[path]

    def text_features(self, texts: Sequence[str], clip_skip: int = 0,
                      embeddings: Sequence[str] = ()) -> tuple[TextConditioning, jax.Array]:
        """(the base model's conditioning of each text, batch B; pooled (B, D) CLIP text
        features, IMR's face-prompt input); clip_skip as CLIPTextModel's; embeddings:
        textual-inversion files whose names the texts may mention."""
        layers = min(getattr(self.modules, name).config.num_layers for name in self.modules.components
                     if name.startswith("text_encoder"))
        if clip_skip >= layers:
            raise InputError(f"--clip_skip {clip_skip}: the text encoder has {layers} layers (at most {layers - 1})")
        loaded = [self.embedding(p) for p in embeddings]
        textual_inversion.check_names(loaded)
        ids, tables = self.modules.family.tokenize(self.tokenizer, texts, loaded, self.modules)
        return self._encode_text(self.params, ids, tables, clip_skip)

    def unconditional_tokens(self) -> np.ndarray:
        """Tokens of a zero identity vector and the CLIP features of an all-zero image: (T, D)."""
        vis = self.modules.vision_encoder.config
        pixels = np.zeros((1, vis.image_size, vis.image_size, vis.num_channels), np.float32)
        hidden = self._clip_tokens(self.params["vision_encoder"], pixels)  # the references' program
        zero_id = np.zeros((1, self.modules.id_dim), np.float32)
        return np.asarray(self._project(self.params["face_projection"], zero_id, hidden))[0]

    def warm_up_identity(self) -> int:
        """Compile every program a reference photo and a face edit run (CLIP tokens, face
        projection, landmark encoder, the [source, target] text batch, IMR, expression
        classifier) on zero inputs of their fixed shapes, so a first request compiles none.
        Returns how many programs were compiled."""
        from dynamicid_jax.compile_count import compiles
        from dynamicid_jax.faces.expression import INPUT_SIZE

        before = compiles()
        tokens = self.unconditional_tokens()  # CLIP tokens + projection of a reference
        if "imr" in self.params:
            size = self.modules.keypoint_encoder.image_size
            landmarks = self._landmark_features(self.params["keypoint_encoder"], np.zeros((1, size, size, 1), np.float32))
            _, pooled = self.text_features(["", ""])
            pooled = np.asarray(pooled)
            np.asarray(self._reconfigure(self.params["imr"], tokens[None], landmarks, pooled[:1], landmarks, pooled[1:]))
        if self.expressions is not None:
            self.expressions.probabilities(np.zeros((1, INPUT_SIZE, INPUT_SIZE), np.float32))
        return compiles() - before

    def describe_face(self, image: np.ndarray, face) -> str:
        """The automatic source prompt: expression classifier + pose bins."""
        from dynamicid_jax.faces.conditioning import source_face_prompt

        if self.expressions is None:
            raise InputError(
                "an expression edit needs the reference face described: give --source_prompt, or an "
                "expression model (--expression_model, see README)"
            )
        probs = self.expressions.predict(image, face)
        return source_face_prompt(max(probs, key=probs.get), face.pose)

    def _landmark_feature(self, face, image_hw) -> jax.Array:
        from dynamicid_jax.faces.conditioning import landmark_image

        size = self.modules.keypoint_encoder.image_size
        dots = landmark_image(face, image_hw, size=size)[None, :, :, None]
        return self._landmark_features(self.params["keypoint_encoder"], np.asarray(dots))

    def face_of(self, path: str, image: Optional[np.ndarray] = None):
        """(largest face, (H, W)) of a photo, analysed once per path and reused."""
        if path not in self._faces:
            image = read_image(path) if image is None else image
            self._faces[path] = (self.faces.largest_face(image, str(path)), image.shape[:2])
        return self._faces[path]

    def reference_tokens(self, path: str) -> np.ndarray:
        """(T, D) face-projection tokens of one reference photo, computed once per path.

        Fixed-shape device work only (resize on the host, numpy in and out, no eager jnp
        op): a photo of any size runs the programs `warm_up_identity` compiled."""
        if path not in self._reference_tokens:
            image = read_image(path)
            face, _ = self.face_of(path, image)
            pixels = clip_preprocess_host(image, size=self.modules.vision_encoder.config.image_size)[None]
            clip_tokens = self._clip_tokens(self.params["vision_encoder"], pixels)
            embedding = np.asarray(face.embedding, np.float32)[None]
            tokens = self._project(self.params["face_projection"], embedding, clip_tokens)
            self._reference_tokens[path] = np.asarray(tokens)[0]
        return self._reference_tokens[path]

    def identity_tokens(self, ident: IdentityRequest) -> tuple[np.ndarray, dict]:
        """(T, D) tokens of one identity (IMR-edited when asked) and what was used."""
        refs = np.stack([self.reference_tokens(p) for p in ident.refs])  # (R, T, D): averaged on the host
        tokens = refs.mean(axis=0, dtype=np.float32).astype(refs.dtype)
        faces = [self.face_of(p)[0] for p in ident.refs]
        info: dict[str, Any] = {"refs": list(ident.refs), "face_boxes": [f.bbox.tolist() for f in faces]}
        if not ident.edits:
            return tokens, info
        if "imr" not in self.params:
            raise InputError(
                "these weights have no IMR (a stage-1 training run): drop --face_prompt/--target_landmarks "
                "or sample from a stage-2 (reconfig) run or the release"
            )
        face, image_hw = self.face_of(ident.refs[0])
        source_prompt = ident.source_prompt or self.describe_face(read_image(ident.refs[0]), face)
        target_prompt = ident.face_prompt or source_prompt
        src_landmarks = self._landmark_feature(face, image_hw)
        if ident.target_landmarks is not None:
            target_face, target_hw = self.face_of(ident.target_landmarks)
            tgt_landmarks = self._landmark_feature(target_face, target_hw)
        else:
            tgt_landmarks = src_landmarks
        _, pooled = self.text_features([source_prompt, target_prompt])
        pooled = np.asarray(pooled)
        tokens = np.asarray(self._reconfigure(
            self.params["imr"], tokens[None], src_landmarks, pooled[:1], tgt_landmarks, pooled[1:]
        ))[0]
        info.update(source_prompt=source_prompt, target_prompt=target_prompt)
        return tokens, info

    # -- denoising ------------------------------------------------------------------------

    @staticmethod
    def initial_noise(seed: int, latent_shape) -> tuple[jax.Array, jax.Array]:
        """(standard-normal start latents (N, h, w, C), per-image keys (N, 2) of the ancestral
        samplers' per-step noise) of a request alone, both fixed by the seed (the start noise
        is the same for every sampler; `batching.noise_rows`/`batching.step_keys`)."""
        noise = jax.random.normal(jax.random.PRNGKey(seed), latent_shape, jnp.float32)
        return noise, jnp.asarray(batching.step_keys([(seed, k) for k in range(latent_shape[0])]))

    def _params_on(self, mesh) -> Params:
        """Parameters placed on `mesh` by sharding.py's rules (replicated unless fsdp > 1), once."""
        if mesh is None:
            return self.params
        if mesh not in self._mesh_params:
            from dynamicid_jax import sharding

            self._mesh_params[mesh] = jax.device_put(self.params, sharding.param_shardings(self.params, mesh))
        return self._mesh_params[mesh]

    def generate_items(
        self, items: Sequence[ImageItem], *, mesh=None, pad_to: Optional[int] = None,
        activation_maps: Optional[dict] = None, activation_steps: Sequence[int] = (),
    ):
        """Images of `items` (equal `batching.shape_key`) in one denoising call.

        mesh: a `sharding.make_mesh` mesh: the image axis is split over its (data, fsdp) axes
        (pad_to must then divide by its size), parameters placed by `sharding.param_shardings`;
        None = the default device. pad_to: batch rows to compute (a short batch is padded, so
        every batch of a run has one compiled shape). Requests must already be validated.
        activation_maps/activation_steps: as `generate` (rows beyond len(items) dropped).
        Returns (images uint8 (len(items), H, W, 3), one details dict per item for its sidecar).
        """
        for item in items:
            self.complete(item.request)
        return self._sample(list(items), self.conditioning, mesh, pad_to, activation_maps, activation_steps)

    def _sample(self, items, cache, mesh=None, pad_to=None, activation_maps=None, activation_steps=()):
        """Rows of `items` through `cache` (`batching.assemble`) -> one denoising call.
        Returns (images uint8 (len(items), H, W, 3), details per item)."""
        request = items[0].request
        f = self.modules.vae_scale_factor
        latent_hwc = (request.height // f, request.width // f, self.modules.unet.config.in_channels)
        arrays, details = batching.assemble(items, cache, latent_hwc, pad_to)
        described = schedulers.describe(request.scheduler, self.scheduler)  # one sampler per batch (shape_key)
        details = [dict(d, scheduler=described) for d in details]
        # Padded to the training length: a new step count reuses the program.
        schedule = schedulers.make_schedule(request.scheduler, self.scheduler, request.steps)
        if mesh is not None:
            from dynamicid_jax import sharding

            if len(arrays["noise"]) % mesh.size:
                raise ValueError(f"a batch of {len(arrays['noise'])} images does not split over {mesh.size} devices")
            arrays = jax.device_put(arrays, sharding.batch_sharding(mesh))
            schedule = jax.device_put(schedule, sharding.replicated(mesh))
        params = self._params_on(mesh)
        capture = activation_maps is not None
        with denoising.host_sink(on_step=self._progress, maps=activation_maps) as sink:
            images = denoising.denoise(
                {"unet": params["unet"], "vae": params["vae"]}, arrays,
                jnp.int32(schedulers.sampler_index(request.scheduler)), schedule,
                _map_steps(activation_steps) if capture else None, sink, modules=self.modules, gating=request.gating,
                use_boxes=batching.uses_boxes(request), with_mix=request.mix is not None, capture_maps=capture,
                report_steps=self._progress is not None,
            )
            images = np.asarray(jax.block_until_ready(images))[: len(items)]
        if capture:
            for step in activation_maps:
                activation_maps[step] = activation_maps[step][: len(items)]
        return np.round((images + 1.0) * 127.5).clip(0, 255).astype(np.uint8), details

    def generate(
        self, request: SampleRequest, progress: Optional[Callable[[int], Any]] = None,
        activation_maps: Optional[dict] = None, activation_steps: Sequence[int] = (),
    ):
        """Run one request. Returns (images uint8 (N, H, W, 3), details dict for the sidecar).

        progress: called as progress(total_steps) once and returns a per-step callback
        (e.g. a tqdm bar's update; it may raise to cancel between steps); None = silent.
        activation_maps: a dict filled with {step: (N, n_ids, h, w) float32} SAA activation
        maps (dynamicid/activation_maps.py) at the 0-based `activation_steps`; compiles a
        separate program, so leave None for plain sampling.
        """
        validate_request(self.complete(request), self.modules.vae_scale_factor,
                         identity_branch=self.modules.identity_branch, family=self.modules.family)
        items = [ImageItem(request, k) for k in range(request.num_images)]
        self.conditioning.prepare(request)  # faces and tokens first: a photo without a face fails here
        self._progress = progress(request.steps) if progress is not None else None
        try:
            images, details = self.generate_items(items, activation_maps=activation_maps,
                                                  activation_steps=activation_steps)
        finally:
            self._progress = None
        return images, details[0]

    def warm_up(self, request: SampleRequest, report_steps: bool = False) -> None:
        """Compile the denoising program for `request`'s shapes (size, batch, identity count,
        boxes) without reading its photos: zero identity tokens, one step. report_steps: the
        program with per-step progress (what `generate(request, progress=...)` runs)."""
        validate_request(self.complete(request), self.modules.vae_scale_factor,
                         identity_branch=self.modules.identity_branch, family=self.modules.family)
        request = dataclasses.replace(request, steps=1, alpha=0)
        items = [ImageItem(request, k) for k in range(request.num_images)]
        self._progress = (lambda: None) if report_steps else None
        try:
            self._sample(items, _NoPhotos(self.conditioning))
        finally:
            self._progress = None


class _NoPhotos:
    """A ConditioningCache stand-in whose identities are zero tokens (warm-up: no photo read)."""

    def __init__(self, cache: batching.ConditioningCache):
        self.cache = cache
        self.pipeline = cache.pipeline

    def text(self, text: str, clip_skip: int = 0, embeddings=()) -> TextConditioning:
        return self.cache.text(text, clip_skip, embeddings)

    def unconditional(self) -> np.ndarray:
        return self.cache.unconditional()

    def identity(self, ident) -> tuple[np.ndarray, dict]:
        return np.zeros_like(self.cache.unconditional()), {}


MAX_MAP_STEPS = 8


def _map_steps(steps: Sequence[int]) -> jax.Array:
    """The capture steps padded with -1 to a fixed (MAX_MAP_STEPS,): their count never recompiles."""
    if len(steps) > MAX_MAP_STEPS:
        raise InputError(f"at most {MAX_MAP_STEPS} activation-map steps, got {len(steps)}")
    return np.asarray(list(steps) + [-1] * (MAX_MAP_STEPS - len(steps)), np.int32)
