"""DynamicID sampling: reference photos + prompt -> pictures, reproducible from a JSON sidecar.

Per identity (one or more reference photos, averaged):
  photo -> largest face -> identity vector (ArcFace/SFace)  \
  photo -> CLIP preprocess -> vision tower, penultimate      > FaceProjection -> tokens (T, D)
  [face prompt and/or target landmarks given] -> IMR(tokens, source motion, target motion)
Then one jitted loop over a batch of images (of one or many requests, `batching`): each
image's classifier-free guidance pair [negative, positive] kept together, the SAA UNet with
every identity's tokens and boxes, DDIM steps, VAE decode.

The denoising loop is a `lax.fori_loop` whose trip count is a traced value over timesteps
padded to the training length, so changing `steps`, `guidance`, `alpha`, `beta`, boxes or
prompts reuses the compiled program; only image size, batch and identity count recompile.
`generate` (one request) and `generate_items` (a batch, optionally over a device mesh) are
the same sampler: a request alone is a batch of its own images.
"""

from __future__ import annotations

import dataclasses
import pathlib
from typing import Any, Callable, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image

from dynamicid_jax import batching, outputs, schedulers
from dynamicid_jax.batching import ImageItem, alpha_steps  # noqa: F401  (alpha_steps: public here too)
from dynamicid_jax.dynamicid.saa import IdentityConditioning, validate_boxes
from dynamicid_jax.modeling import DynamicIDModules, Params
from dynamicid_jax.models.clip import clip_preprocess

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


class InputError(ValueError):
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


@dataclasses.dataclass
class SampleRequest:
    """Every setting of one sampling call; `to_json`/`from_json` make the sidecar."""

    identities: list[IdentityRequest]
    prompt: str
    negative_prompt: str = ""
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

    def to_json(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, data: dict) -> "SampleRequest":
        data = dict(data)
        data["identities"] = [IdentityRequest(**d) for d in data["identities"]]
        return cls(**data)


def validate_request(request: SampleRequest, vae_factor: int) -> None:
    """Raise InputError naming the first unusable setting."""
    n = len(request.identities)
    if n == 0:
        raise InputError("at least one identity (--ref) is required")
    for i, ident in enumerate(request.identities):
        if not ident.refs:
            raise InputError(f"identity {i} has no reference image")
    given = [ident.box is not None for ident in request.identities]
    if any(given) and not all(given):
        raise InputError(f"boxes and identities differ in count: {sum(given)} boxes for {n} identities")
    if all(given):
        try:
            validate_boxes(np.asarray([ident.box for ident in request.identities], np.float32))
        except ValueError as e:
            raise InputError(f"--box: {e}") from e
    if request.mix is not None and not 0.0 <= request.mix <= 1.0:
        raise InputError(f"--mix must be in [0, 1], got {request.mix}")
    for name in ("height", "width"):
        value = getattr(request, name)
        if value <= 0 or value % vae_factor:
            raise InputError(f"--{name} must be a positive multiple of {vae_factor}, got {value}")
    if not 1 <= request.steps <= 1000:
        raise InputError(f"--steps must be in [1, 1000], got {request.steps}")
    if request.num_images < 1:
        raise InputError(f"--num_images must be >= 1, got {request.num_images}")
    if isinstance(request.alpha, float) and not 0.0 < request.alpha <= 1.0:
        raise InputError(f"--alpha as a fraction must be in (0, 1], got {request.alpha}")
    if isinstance(request.alpha, int) and request.alpha < 0:
        raise InputError(f"--alpha as a step count must be >= 0, got {request.alpha}")


def check_images_readable(request: SampleRequest) -> None:
    """Read every reference and target-landmark photo once, so a bad file fails before any
    model is loaded or compiled (InputError naming it)."""
    for ident in request.identities:
        for path in ident.refs + ([ident.target_landmarks] if ident.target_landmarks else []):
            read_image(path)


def read_image(path: str | pathlib.Path) -> np.ndarray:
    """RGB uint8 (H, W, 3); InputError naming the file when it cannot be read."""
    path = pathlib.Path(path)
    if not path.is_file():
        raise InputError(f"image not found: {path}")
    try:
        with Image.open(path) as im:
            return np.asarray(im.convert("RGB"))
    except Exception as e:  # PIL raises several types for corrupt files
        raise InputError(f"cannot read image {path}: {e}") from e


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
        self.table = schedulers.noise_table(scheduler)
        self.provenance = dict(provenance or {})
        self._progress: Optional[Callable[[], None]] = None
        self.conditioning = batching.ConditioningCache(self)
        self._faces: dict[str, tuple[Any, tuple[int, int]]] = {}  # photo -> (largest face, (H, W))
        self._reference_tokens: dict[str, jax.Array] = {}  # photo -> projected tokens (T, D)
        self._mesh_params: dict[Any, Params] = {}
        self._encode_text = jax.jit(lambda p, ids: modules.text_encoder.apply({"params": p}, ids))
        self._clip_tokens = jax.jit(self._clip_tokens_fn)
        self._project = jax.jit(lambda p, e, c: modules.face_projection.apply({"params": p}, e, c))
        self._landmark_features = jax.jit(lambda v, x: modules.keypoint_encoder.apply(v, x, train=False))
        self._reconfigure = jax.jit(lambda p, *a: modules.imr.apply({"params": p}, *a))
        self._denoise = jax.jit(self._denoise_fn, static_argnames=("gating", "use_boxes", "with_mix"))

    # -- identity -------------------------------------------------------------------------

    def _clip_tokens_fn(self, params, images_uint8):
        pixels = clip_preprocess(images_uint8, size=self.modules.vision_encoder.config.image_size)
        _, _, hidden = self.modules.vision_encoder.apply({"params": params}, pixels)
        return hidden[-2]  # penultimate layer, as IP-Adapter-FaceID-Plus

    def text_features(self, texts: Sequence[str]) -> tuple[jax.Array, jax.Array]:
        """(states (B, 77, D), pooled (B, D)) of the text encoder."""
        ids = jnp.asarray(self.tokenizer(list(texts)))
        return self._encode_text(self.params["text_encoder"], ids)

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

    def _on_step(self, step):
        if self._progress is not None:
            self._progress()

    def _denoise_fn(
        self, unet_params, vae_params, noise, context, id_tokens, boxes, timesteps, prev_timesteps, num_steps,
        guidance, alpha_count, beta, id_scale, mix, *, gating: bool, use_boxes: bool, with_mix: bool,
    ):
        """Per image (N rows, see `batching`): noise (N, h, w, C); context (N, 2, L, D) and
        id_tokens (N, 2, n, T, D) as [negative, positive]; boxes (N, n, 4); guidance,
        alpha_count, beta, id_scale, mix (N,). timesteps/prev padded to the training length;
        num_steps traced. Returns images (N, H, W, 3) float32 in [-1, 1].

        The UNet batch is 2N rows [neg_0, pos_0, neg_1, pos_1, ...]: (N, 2, ...) reshaped, so
        with the image axis split over devices every CFG pair stays on its image's device."""
        unet, table = self.modules.unet, self.table
        pairs = lambda a: a.reshape((-1,) + a.shape[2:])  # noqa: E731  (N, 2, ...) -> (2N, ...)
        rows = lambda v: jnp.repeat(v, 2)[:, None]  # noqa: E731  (N,) -> (2N, 1): broadcasts over queries
        context, id_tokens, boxes = pairs(context), pairs(id_tokens), jnp.repeat(boxes, 2, axis=0)
        guidance = guidance[:, None, None, None]

        def body(i, x):
            t, prev = timesteps[i], prev_timesteps[i]
            identity = IdentityConditioning(
                tokens=id_tokens, boxes=boxes, layout_active=rows(i < alpha_count), beta=rows(beta),
                id_scale=rows(id_scale), mix=rows(mix)[..., None, None] if with_mix else None, use_boxes=use_boxes,
                gating=gating,
            )
            x2 = jnp.repeat(x, 2, axis=0)
            eps = unet.apply({"params": unet_params}, x2, jnp.broadcast_to(t, (x2.shape[0],)), context, identity)
            eps = eps.reshape((-1, 2) + eps.shape[1:])
            uncond, cond = eps[:, 0], eps[:, 1]
            guided = uncond + guidance * (cond - uncond)
            x, _ = schedulers.ddim_step(table, guided, t, prev, x)
            jax.debug.callback(self._on_step, i)
            return x

        latents = jax.lax.fori_loop(0, num_steps, body, noise)
        scale = self.modules.vae.config.scaling_factor
        images = self.modules.vae.apply({"params": vae_params}, latents / scale, method="decode")
        return jnp.clip(images, -1.0, 1.0)

    def _timesteps(self, steps: int) -> tuple[jax.Array, jax.Array]:
        """(timesteps, previous timesteps), padded to the training length so that a new step
        count reuses the compiled program."""
        total = self.scheduler.num_train_timesteps
        ts = schedulers.ddim_timesteps(self.scheduler, steps)
        prev = schedulers.ddim_prev_timesteps(self.scheduler, ts)
        pad = total - steps
        return jnp.pad(ts, (0, pad)), jnp.pad(prev, (0, pad))

    def _params_on(self, mesh) -> Params:
        """Parameters placed on `mesh` by sharding.py's rules (replicated unless fsdp > 1), once."""
        if mesh is None:
            return self.params
        if mesh not in self._mesh_params:
            from dynamicid_jax import sharding

            self._mesh_params[mesh] = jax.device_put(self.params, sharding.param_shardings(self.params, mesh))
        return self._mesh_params[mesh]

    def generate_items(self, items: Sequence[ImageItem], *, mesh=None, pad_to: Optional[int] = None):
        """Images of `items` (equal `batching.shape_key`) in one denoising call.

        mesh: a `sharding.make_mesh` mesh: the image axis is split over its (data, fsdp) axes
        (pad_to must then divide by its size), parameters placed by `sharding.param_shardings`;
        None = the default device. pad_to: batch rows to compute (a short batch is padded, so
        every batch of a run has one compiled shape). Requests must already be validated.
        Returns (images uint8 (len(items), H, W, 3), one details dict per item for its sidecar).
        """
        request = items[0].request
        f = self.modules.vae_scale_factor
        latent_hwc = (request.height // f, request.width // f, self.modules.unet.config.in_channels)
        arrays, details = batching.assemble(list(items), self.conditioning, latent_hwc, pad_to)
        ts, prev = self._timesteps(request.steps)
        if mesh is not None:
            from dynamicid_jax import sharding

            if len(arrays["noise"]) % mesh.size:
                raise ValueError(f"a batch of {len(arrays['noise'])} images does not split over {mesh.size} devices")
            arrays = jax.device_put(arrays, sharding.batch_sharding(mesh))
            ts, prev = jax.device_put((ts, prev), sharding.replicated(mesh))
        params = self._params_on(mesh)
        a = arrays
        images = self._denoise(
            params["unet"], params["vae"], a["noise"], a["context"], a["id_tokens"], a["boxes"], ts, prev,
            np.int32(request.steps), a["guidance"], a["alpha_count"], a["beta"], a["id_scale"], a["mix"],
            gating=request.gating, use_boxes=batching.uses_boxes(request), with_mix=request.mix is not None,
        )
        images = np.asarray(jax.block_until_ready(images))[: len(items)]
        return np.round((images + 1.0) * 127.5).clip(0, 255).astype(np.uint8), details

    def generate(self, request: SampleRequest, progress: Optional[Callable[[int], Any]] = None):
        """Run one request. Returns (images uint8 (N, H, W, 3), details dict for the sidecar).

        progress: called as progress(total_steps) once and returns a per-step callback
        (e.g. a tqdm bar's update); None = silent.
        """
        validate_request(request, self.modules.vae_scale_factor)
        items = [ImageItem(request, k) for k in range(request.num_images)]
        self.conditioning.prepare(request)  # faces and tokens first: a photo without a face fails here
        self._progress = progress(request.steps) if progress is not None else None
        try:
            images, details = self.generate_items(items)
        finally:
            self._progress = None
        return images, details[0]


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
