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
import math
import pathlib
from typing import Any, Callable, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from dynamicid_jax import batching, denoising, images, outputs, schedulers
from dynamicid_jax.batching import ImageItem, alpha_steps  # noqa: F401  (alpha_steps: public here too)
from dynamicid_jax.dynamicid.saa import validate_boxes
from dynamicid_jax.errors import UserError
from dynamicid_jax.modeling import DynamicIDModules, Params
from dynamicid_jax.models import textual_inversion
from dynamicid_jax.models.clip import clip_preprocess

IMAGE_SUFFIXES = images.IMAGE_SUFFIXES


class InputError(UserError, ValueError):
    """A user input that cannot be used (names the input); the CLI exits 2 on it."""


# ----------------------------------------------------------------------------- requests


@dataclasses.dataclass
class IdentityRequest:
    """One person in the picture.

    refs: reference photo paths of this person (several are averaged in token space).
    box: normalised [y_min, x_min, y_max, x_max] where this person should appear.
    face_prompt: target face prompt for IMR, e.g. "a very surprised expression, front view".
    target_landmarks: a photo whose largest face gives the target landmarks (head pose).
    source_prompt: the reference face's own description; automatic when None.
    """

    refs: list[str]
    box: Optional[list[float]] = None
    face_prompt: Optional[str] = None
    target_landmarks: Optional[str] = None
    source_prompt: Optional[str] = None

    @property
    def edits(self) -> bool:
        return self.face_prompt is not None or self.target_landmarks is not None


# The one set of sampling defaults (the paper's release settings): SampleRequest's fields
# below, and the CLI's through configs/base.py (`sampling_defaults()`), so a library caller
# and a `launch/sample.py` user asking for the same thing get the same picture.
DEFAULT_NEGATIVE_PROMPT = "lowres, bad anatomy, worst quality, low quality, blurry, deformed"
DEFAULT_KEYS = ("steps", "guidance", "height", "width", "alpha", "beta", "id_scale", "negative_prompt", "scheduler")

# Largest request accepted (checked before any model is loaded; see validate_request).
MAX_IMAGE_SIDE = 2048  # px: SD1.5 latents 256 x 256, 65,536 tokens in the first level's self-attention
MAX_BATCH_PIXELS = 8 * 1024 * 1024  # num_images x height x width: eight 1024 px or two 2048 px pictures


@dataclasses.dataclass
class SampleRequest:
    """Every setting of one sampling call; `to_json`/`from_json` make the sidecar."""

    identities: list[IdentityRequest]
    prompt: str
    negative_prompt: str = DEFAULT_NEGATIVE_PROMPT
    seed: int = 0
    steps: int = 50
    guidance: float = 5.0
    height: int = 512
    width: int = 512
    num_images: int = 1
    alpha: float | int = 3
    beta: float = 4.0
    id_scale: float = 1.0
    mix: Optional[float] = None
    gating: bool = True
    scheduler: str = "ddim"  # one of schedulers.SCHEDULERS
    clip_skip: int = 0  # text states this many layers before the last (1 = penultimate)
    # Textual-inversion files (`models.textual_inversion`): each file's stem, written in either
    # prompt, stands for its vectors; a stem the negative prompt does not mention is appended
    # to it here (", stem"), so the stored request is what was encoded.
    negative_embeddings: list[str] = dataclasses.field(default_factory=list)

    def __post_init__(self):
        if self.negative_embeddings and isinstance(self.negative_prompt, str) and isinstance(
                self.negative_embeddings, list) and all(isinstance(p, str) for p in self.negative_embeddings):
            self.negative_prompt = textual_inversion.with_names(
                self.negative_prompt, [pathlib.Path(p).stem for p in self.negative_embeddings])

    def to_json(self) -> dict:
        data = dataclasses.asdict(self)
        if not data["negative_embeddings"]:  # so sidecars from before this field still match (outputs.reusable)
            del data["negative_embeddings"]
        return data

    @classmethod
    def from_json(cls, data: dict) -> "SampleRequest":
        """A request from its sidecar dict; InputError naming a missing or unknown field."""
        if not isinstance(data, dict) or not isinstance(data.get("identities"), list):
            raise InputError("not a sampling request: expected an object with an 'identities' list")
        data = dict(data)
        try:
            data["identities"] = [IdentityRequest(**d) for d in data["identities"]]
            return cls(**data)
        except TypeError as e:  # unknown or missing fields
            raise InputError(f"not a sampling request: {e}") from None


def sampling_defaults() -> dict:
    """{field: default} of the sampling settings a config may override (configs/base.py)."""
    fields = {f.name: f.default for f in dataclasses.fields(SampleRequest)}
    return {k: fields[k] for k in DEFAULT_KEYS}


def _is_int(value) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


def _is_number(value) -> bool:
    return _is_int(value) or (isinstance(value, (float, np.floating)))


def _check_finite(name: str, value, *, above: Optional[float] = None) -> None:
    if not _is_number(value) or not math.isfinite(value):
        raise InputError(f"--{name} must be a finite number, got {value!r}")
    if above is not None and not value > above:
        raise InputError(f"--{name} must be > {above:g}, got {value!r}")


def validate_request(request: SampleRequest, vae_factor: int) -> None:
    """Raise InputError naming the first unusable setting (before any model runs).

    Rules: at least one identity, each with a reference; boxes for all identities or none,
    inside [0, 1] with min < max; guidance, id_scale and mix finite (mix in [0, 1]); beta
    finite and > -1 (the layout divides by beta + 1); alpha an int step count >= 0 or a
    float fraction of the steps in (0, 1]; steps in [1, 1000]; height and width positive
    multiples of `vae_factor`, each at most MAX_IMAGE_SIDE px, and num_images x height x
    width at most MAX_BATCH_PIXELS (larger latents would not fit a device's memory).
    """
    n = len(request.identities)
    if n == 0:
        raise InputError("at least one identity (--ref) is required")
    for i, ident in enumerate(request.identities):
        if not ident.refs:
            raise InputError(f"identity {i} has no reference image")
    for name in ("prompt", "negative_prompt"):
        if not isinstance(getattr(request, name), str):
            raise InputError(f"--{name} must be text, got {getattr(request, name)!r}")
    given = [ident.box is not None for ident in request.identities]
    if any(given) and not all(given):
        raise InputError(f"boxes and identities differ in count: {sum(given)} boxes for {n} identities")
    if all(given):
        try:
            validate_boxes(np.asarray([ident.box for ident in request.identities], np.float32))
        except (TypeError, ValueError) as e:
            raise InputError(f"--box: {e}") from e
    _check_finite("guidance", request.guidance)
    _check_finite("id_scale", request.id_scale)
    _check_finite("beta", request.beta, above=-1.0)
    if request.mix is not None:
        _check_finite("mix", request.mix)
        if not 0.0 <= request.mix <= 1.0:
            raise InputError(f"--mix must be in [0, 1], got {request.mix}")
    for name in ("seed", "steps", "num_images", "height", "width"):
        if not _is_int(getattr(request, name)):
            raise InputError(f"--{name} must be an integer, got {getattr(request, name)!r}")
    for name in ("height", "width"):
        value = getattr(request, name)
        if value <= 0 or value % vae_factor:
            raise InputError(f"--{name} must be a positive multiple of {vae_factor}, got {value}")
        if value > MAX_IMAGE_SIDE:
            raise InputError(f"--{name} {value} exceeds the {MAX_IMAGE_SIDE} px limit (its latents would not fit)")
    if request.scheduler not in schedulers.SCHEDULERS:
        raise InputError(f"--scheduler {request.scheduler!r} is unknown; choose one of {', '.join(schedulers.SCHEDULERS)}")
    # LCM picks its steps from a 50-step distillation schedule.
    limit = schedulers.samplers.LCM_ORIGINAL_STEPS if request.scheduler == "lcm" else 1000
    if not 1 <= request.steps <= limit:
        raise InputError(f"--steps must be in [1, {limit}] for --scheduler {request.scheduler}, got {request.steps}")
    if request.clip_skip < 0:
        raise InputError(f"--clip_skip must be >= 0, got {request.clip_skip}")
    embeddings = request.negative_embeddings
    if not isinstance(embeddings, list) or not all(isinstance(p, str) and p for p in embeddings):
        raise InputError(f"--negative_embedding must be a list of file paths, got {embeddings!r}")
    if request.num_images < 1:
        raise InputError(f"--num_images must be >= 1, got {request.num_images}")
    pixels = request.num_images * request.height * request.width
    if pixels > MAX_BATCH_PIXELS:
        raise InputError(
            f"--num_images {request.num_images} x --height {request.height} x --width {request.width} = {pixels} "
            f"pixels exceeds the {MAX_BATCH_PIXELS} per call (the latents would not fit): make fewer images per call"
        )
    alpha = request.alpha
    if _is_int(alpha):
        if alpha < 0:
            raise InputError(f"--alpha as a step count must be >= 0, got {alpha}")
    elif isinstance(alpha, (float, np.floating)):
        if not (math.isfinite(alpha) and 0.0 < alpha <= 1.0):
            raise InputError(f"--alpha as a fraction must be in (0, 1], got {alpha}")
    else:
        raise InputError(f"--alpha must be a step count (e.g. 12) or a fraction in (0, 1] (e.g. 0.24), got {alpha!r}")


def check_images_readable(request: SampleRequest) -> None:
    """Read every reference and target-landmark photo once, so a bad file fails before any
    model is loaded or compiled (InputError naming it)."""
    for ident in request.identities:
        for path in ident.refs + ([ident.target_landmarks] if ident.target_landmarks else []):
            read_image(path)


def check_embeddings_readable(request: SampleRequest, width: Optional[int] = None) -> None:
    """Read every textual-inversion file of the request once (`width`: the text encoder's, from
    the config), so a bad or mis-sized file fails before any model loads."""
    loaded = [textual_inversion.read_embedding(p, width) for p in request.negative_embeddings]
    textual_inversion.check_names(loaded)


def read_image(path: str | pathlib.Path) -> np.ndarray:
    """Upright RGB uint8 (H, W, 3) via the one reader (`dynamicid_jax.images.read_rgb`: EXIF
    orientation, every PIL mode); InputError naming the file when it cannot be read."""
    try:
        return images.read_rgb(path)
    except images.ImageError as e:
        raise InputError(str(e)) from None


# ----------------------------------------------------------------------------- pipeline


class DynamicIDPipeline:
    """Holds modules, parameters and the face models; `generate` runs one request.

    tokenizer: `dynamicid_jax.tokenizer.CLIPTokenizer`. faces: a FaceAnalyzer whose
    embedding size matches `modules.id_dim`. expressions: an ExpressionClassifier, needed
    only to describe a reference face automatically for IMR (else give source_prompt).
    provenance: what the weights are (paths, or "tiny random"), copied to every sidecar.
    """

    def __init__(
        self,
        modules: DynamicIDModules,
        params: Params,
        tokenizer,
        faces,
        scheduler: schedulers.SchedulerConfig,
        expressions=None,
        provenance: Optional[dict] = None,
    ):
        if faces.embedding_dim != modules.id_dim:
            raise InputError(
                f"face model set {faces.name!r} gives {faces.embedding_dim}-d identity vectors but the "
                f"face projection expects {modules.id_dim}-d (use the face models the weights were trained with)"
            )
        self.modules = modules
        self.params = params
        self.tokenizer = tokenizer
        self.faces = faces
        self.expressions = expressions
        self.scheduler = scheduler
        self.provenance = dict(provenance or {})
        self._progress: Optional[Callable[[], None]] = None  # per denoising step, when asked (`generate`)
        self.conditioning = batching.ConditioningCache(self)
        self._faces: dict[str, tuple[Any, tuple[int, int]]] = {}  # photo -> (largest face, (H, W))
        self._reference_tokens: dict[str, jax.Array] = {}  # photo -> projected tokens (T, D)
        self._mesh_params: dict[Any, Params] = {}
        # One program for every text: embedding tokens come in as a per-text table (traced).
        self._encode_text = jax.jit(
            lambda p, ids, extra, skip: modules.text_encoder.apply({"params": p}, ids, skip, extra), static_argnums=3)
        self._embeddings: dict[str, textual_inversion.TextualInversion] = {}  # file -> embedding
        self._clip_tokens = jax.jit(self._clip_tokens_fn)
        self._project = jax.jit(lambda p, e, c: modules.face_projection.apply({"params": p}, e, c))
        self._landmark_features = jax.jit(lambda v, x: modules.keypoint_encoder.apply(v, x, train=False))
        self._reconfigure = jax.jit(lambda p, *a: modules.imr.apply({"params": p}, *a))

    # -- identity -------------------------------------------------------------------------

    def _clip_tokens_fn(self, params, images_uint8):
        pixels = clip_preprocess(images_uint8, size=self.modules.vision_encoder.config.image_size)
        _, _, hidden = self.modules.vision_encoder.apply({"params": params}, pixels)
        return hidden[-2]  # penultimate layer, as IP-Adapter-FaceID-Plus

    def embedding(self, path: str) -> textual_inversion.TextualInversion:
        """A textual-inversion file, read once and checked against the text encoder's width."""
        if path not in self._embeddings:
            width = self.modules.text_encoder.config.hidden_size
            self._embeddings[path] = textual_inversion.read_embedding(path, width)
        return self._embeddings[path]

    def text_features(self, texts: Sequence[str], clip_skip: int = 0,
                      embeddings: Sequence[str] = ()) -> tuple[jax.Array, jax.Array]:
        """(states (B, 77, D), pooled (B, D)) of the text encoder; clip_skip as CLIPTextModel's;
        embeddings: textual-inversion files whose names the texts may mention."""
        config = self.modules.text_encoder.config
        if clip_skip >= config.num_layers:
            raise InputError(f"--clip_skip {clip_skip}: the text encoder has {config.num_layers} layers "
                             f"(at most {config.num_layers - 1})")
        loaded = [self.embedding(p) for p in embeddings]
        textual_inversion.check_names(loaded)
        rows = [textual_inversion.tokenize(self.tokenizer, t, loaded, config.vocab_size, config.hidden_size)
                for t in texts]
        ids, tables = (jnp.asarray(np.stack(a)) for a in zip(*rows))
        return self._encode_text(self.params["text_encoder"], ids, tables, clip_skip)

    def unconditional_tokens(self) -> jax.Array:
        """Tokens of a zero identity vector and the CLIP features of an all-zero image: (T, D)."""
        vis = self.modules.vision_encoder.config
        pixels = jnp.zeros((1, vis.image_size, vis.image_size, vis.num_channels))
        _, _, hidden = self.modules.vision_encoder.apply({"params": self.params["vision_encoder"]}, pixels)
        zero_id = jnp.zeros((1, self.modules.id_dim))
        return self._project(self.params["face_projection"], zero_id, hidden[-2])[0]

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
        return self._landmark_features(self.params["keypoint_encoder"], jnp.asarray(dots))

    def face_of(self, path: str, image: Optional[np.ndarray] = None):
        """(largest face, (H, W)) of a photo, analysed once per path and reused."""
        if path not in self._faces:
            image = read_image(path) if image is None else image
            self._faces[path] = (self.faces.largest_face(image, str(path)), image.shape[:2])
        return self._faces[path]

    def reference_tokens(self, path: str) -> jax.Array:
        """(T, D) face-projection tokens of one reference photo, computed once per path."""
        if path not in self._reference_tokens:
            image = read_image(path)
            face, _ = self.face_of(path, image)
            clip_tokens = self._clip_tokens(self.params["vision_encoder"], jnp.asarray(image)[None])
            embedding = jnp.asarray(face.embedding, jnp.float32)[None]
            self._reference_tokens[path] = self._project(self.params["face_projection"], embedding, clip_tokens)[0]
        return self._reference_tokens[path]

    def identity_tokens(self, ident: IdentityRequest) -> tuple[jax.Array, dict]:
        """(T, D) tokens of one identity (IMR-edited when asked) and what was used."""
        tokens = jnp.mean(jnp.stack([self.reference_tokens(p) for p in ident.refs]), axis=0)
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
        tokens = self._reconfigure(
            self.params["imr"], tokens[None], src_landmarks, pooled[:1], tgt_landmarks, pooled[1:]
        )[0]
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
        a = arrays
        with denoising.host_sink(on_step=self._progress, maps=activation_maps) as sink:
            images = denoising.denoise(
                params["unet"], params["vae"], a["noise"], a["context"], a["id_tokens"], a["boxes"],
                jnp.int32(schedulers.sampler_index(request.scheduler)), schedule, a["step_key"],
                a["guidance"], a["alpha_count"], a["beta"], a["id_scale"], a["mix"],
                _map_steps(activation_steps) if capture else None, sink,
                modules=self.modules, scheduler=self.scheduler, gating=request.gating,
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
        validate_request(request, self.modules.vae_scale_factor)
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
        validate_request(request, self.modules.vae_scale_factor)
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

    def text(self, text: str, clip_skip: int = 0, embeddings=()) -> np.ndarray:
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
    return jnp.asarray(list(steps) + [-1] * (MAX_MAP_STEPS - len(steps)), jnp.int32)


def save_outputs(
    out_dir: str | pathlib.Path, images: np.ndarray, request: SampleRequest, details: dict, provenance: dict,
    stem: str = "dynamicid",
) -> list[pathlib.Path]:
    """Write `stem-SEED-K.png` and a sidecar `stem-SEED-K.json` per image (`outputs.save_image`).
    Returns the PNG paths.

    The sidecar holds the whole request (so `launch/sample.py --from_json` reproduces the
    image), what the run resolved (boxes, automatic prompts) and the weights' provenance.
    """
    paths = []
    for k, image in enumerate(images):
        png = output_path(out_dir, request, k, stem)
        outputs.save_image(png, image, request, details, provenance, image_index=k)
        paths.append(png)
    return paths


def output_path(out_dir: str | pathlib.Path, request: SampleRequest, index: int, stem: str = "dynamicid") -> pathlib.Path:
    """Where picture `index` of `request` goes: OUT/stem-SEED-K.png."""
    return pathlib.Path(out_dir) / f"{stem}-{request.seed}-{index}.png"
