"""The synthetic face world that the benchmark (forgeries.py) forges and pretrain.py photographs:
random identities, scenes and head poses, a face rendered from them, its landmarks, and the
camera's post-processing. Nothing here forges: pretrain.py's backbone never sees a forgery.

Faces are drawn in face coordinates (u right, v down; the face outline is an ellipse with
half-axes a, b around the origin); a pose maps image coordinates in [-1, 1] onto them.
Letters: H, W image height and width, C = 3 colour channels.
"""
import math
from typing import NamedTuple

import numpy as np
from PIL import Image
from scipy import ndimage

from data import _jpeg


class Identity(NamedTuple):
    """Who the face is: outline, colours (RGB in [0, 1]) and features, in face coordinates."""
    a: float  # face half-width
    b: float  # face half-height
    jaw: float  # how much the outline narrows towards the chin
    skin: np.ndarray  # (C,)
    hair: np.ndarray  # (C,)
    iris: np.ndarray  # (C,)
    lips: np.ndarray  # (C,)
    hair_style: int  # 0 bald, 1 short, 2 long
    hairline: float  # v of the hairline
    eye_u: float  # eyes centred at (+-eye_u, eye_v), half-width eye_w, half-height eye_h
    eye_v: float
    eye_w: float
    eye_h: float
    brow_v: float  # eyebrow height, thickness and arch
    brow_t: float
    brow_arch: float
    nose_v: float  # nostrils at (+-nose_w / 2, nose_v)
    nose_w: float
    mouth_v: float  # mouth centred at (0, mouth_v), half-width, half-height
    mouth_w: float
    mouth_h: float
    texture_seed: int  # skin pores


class Pose(NamedTuple):
    cx: float  # face centre in image coordinates
    cy: float
    scale: float
    roll: float  # in-plane rotation (radians)
    yaw: float  # left-right head turn: the inner features slide sideways
    eye_open: float  # expression
    mouth_open: float
    smile: float
    gaze: float


class Scene(NamedTuple):
    """What stays fixed in one video besides the face: backdrop, light, camera."""
    backdrop: np.ndarray  # (3, C) top, bottom and clothes colours
    backdrop_seed: int  # low-frequency backdrop texture
    light: np.ndarray  # (3,) unit vector towards the light
    ambient: float  # share of light that does not depend on the direction
    gains: np.ndarray  # (C,) white balance
    blur: float  # lens blur sigma, pixels at 128 px
    noise: float  # sensor noise std
    quality: int  # JPEG quality
    pose: Pose  # the video's mean pose; its frames jitter around it


class Face(NamedTuple):
    image: np.ndarray  # (H, W, C) float32 RGB in [0, 1], before camera post-processing
    u: np.ndarray  # (H, W) face coordinates of every pixel
    v: np.ndarray
    ident: Identity
    pose: Pose
    fg: np.ndarray = None  # (H, W) in [0, 1]: the person (head, hair, neck, clothes), 0 on the backdrop


HAIR = np.float32([[.08, .06, .05], [.25, .15, .08], [.45, .3, .16], [.82, .68, .42], [.55, .25, .1], [.62, .62, .6]])
_IRIS = np.float32([[.3, .18, .08], [.12, .08, .05], [.3, .45, .65], [.3, .45, .25], [.45, .35, .15]])
# Scalars stay Python floats (rng.uniform() without a size) so that the drawing stays float32.


def random_identity(rng) -> Identity:
    tone = rng.uniform()  # light to dark skin
    skin = ((1 - tone) * np.float32([.95, .8, .68]) + tone * np.float32([.4, .26, .17])) * rng.uniform(.94, 1.06, 3)
    skin, eye_v = skin.astype(np.float32), rng.uniform(-.13, -.05)
    return Identity(
        a=rng.uniform(.5, .6), b=rng.uniform(.7, .8), jaw=rng.uniform(.15, .4),
        skin=skin, hair=HAIR[rng.integers(6)] * rng.uniform(.85, 1.15), iris=_IRIS[rng.integers(5)],
        lips=skin * np.float32([.92, .62, .62]) * rng.uniform(.85, 1.05),
        hair_style=int(rng.choice(3, p=[.1, .5, .4])), hairline=rng.uniform(-.62, -.45),
        eye_u=rng.uniform(.19, .25), eye_v=eye_v, eye_w=rng.uniform(.09, .12), eye_h=rng.uniform(.045, .06),
        brow_v=eye_v - rng.uniform(.1, .14), brow_t=rng.uniform(.025, .05), brow_arch=rng.uniform(0, .05),
        nose_v=rng.uniform(.15, .24), nose_w=rng.uniform(.06, .09),
        mouth_v=rng.uniform(.37, .46), mouth_w=rng.uniform(.14, .2), mouth_h=rng.uniform(.03, .045),
        texture_seed=int(rng.integers(2**31)))


def random_scene(rng) -> Scene:
    light = np.float32([rng.uniform(-.7, .7), rng.uniform(-.6, .3), 1])
    pose = Pose(cx=rng.uniform(-.06, .06), cy=rng.uniform(-.02, .08), scale=rng.uniform(.9, 1.05),
                roll=rng.uniform(-.15, .15), yaw=rng.uniform(-.4, .4), eye_open=rng.uniform(.7, 1),
                mouth_open=rng.uniform(0, .4) * (rng.random() < .5), smile=rng.uniform(-.2, .6), gaze=0.)
    backdrop = rng.uniform(.2, .8, (3, 1)) + rng.uniform(-.25, .25, (3, 3))  # muted colours
    return Scene(backdrop=np.clip(backdrop, 0, 1).astype(np.float32), backdrop_seed=int(rng.integers(2**31)),
                 light=light / np.linalg.norm(light), ambient=rng.uniform(.35, .6),
                 gains=rng.uniform(.92, 1.08, 3).astype(np.float32), blur=rng.uniform(0, .8),
                 noise=rng.uniform(.004, .025), quality=int(rng.integers(60, 96)), pose=pose)


def jitter_pose(p: Pose, rng) -> Pose:
    """One frame of a video: small head motion, changing expression, now and then a blink."""
    n = rng.normal(size=6).tolist()
    return p._replace(cx=p.cx + .015 * n[0], cy=p.cy + .015 * n[1], scale=p.scale * (1 + .015 * n[2]),
                      roll=p.roll + .03 * n[3], yaw=p.yaw + .05 * n[4],
                      eye_open=.12 if rng.random() < .05 else min(max(p.eye_open + .1 * n[5], .5), 1.),
                      mouth_open=max(0., p.mouth_open + rng.uniform(-.15, .15)), gaze=rng.uniform(-.3, .3))


def _ellipse(u, v, cu, cv, au, av, aa):
    """Soft ellipse: 1 inside, 0 outside, an anti-aliasing ramp of width ~aa at the outline."""
    d = np.sqrt(((u - cu) / au) ** 2 + ((v - cv) / av) ** 2)
    return np.clip((1 - d) * min(au, av) / aa, 0, 1)


def _paint(img, alpha, colour):
    """'Over' compositing in place, on the band of rows that the shape covers."""
    rows = np.flatnonzero(alpha.max(1) > 0)
    if rows.size:
        band = slice(rows[0], rows[-1] + 1)
        colour = colour[band] if np.ndim(colour) == 3 else colour
        img[band] += alpha[band, :, None] * (colour - img[band])


def resize(img, size, resample):  # (H, W, C) float32 -> (size, size, C), channel by channel
    channels = [Image.fromarray(img[..., c]).resize((size, size), resample) for c in range(3)]
    return np.stack([np.asarray(c) for c in channels], -1)


def render_face(ident: Identity, scene: Scene, pose: Pose, size: int) -> Face:
    """Draw a face-like frame: backdrop, clothes, neck, ears, textured skin, nose, mouth, eyes,
    brows and hair, painted back to front as anti-aliased soft shapes, then lit as an ellipsoid."""
    i, (top, bottom, clothes) = ident, scene.backdrop
    t = (np.arange(size, dtype=np.float32) + .5) * (2 / size) - 1
    x, y = np.meshgrid(t, t)  # (H, W) image coordinates in [-1, 1]
    c, s = math.cos(pose.roll), math.sin(pose.roll)
    xs, ys = (x - pose.cx) / pose.scale, (y - pose.cy) / pose.scale
    u, v = c * xs + s * ys, c * ys - s * xs  # (H, W) face coordinates
    aa = 3 / (size * pose.scale)  # 1.5 pixels in face units
    texture = np.random.default_rng(scene.backdrop_seed).uniform(-.08, .08, (5, 5, 3)).astype(np.float32)
    img = top + (y[..., None] + 1) / 2 * (bottom - top) + resize(texture, size, Image.BILINEAR)  # (H, W, C)
    pores = np.random.default_rng(i.texture_seed).standard_normal((size, size), dtype=np.float32)
    iu, iv = (np.clip(((w + 1) * size / 2).astype(int), 0, size - 1) for w in (u, v))
    pores = pores[iv, iu]  # (H, W) the texture moves with the face
    skin = i.skin * (1 + .025 * pores)[..., None]  # (H, W, C)
    strands = i.hair * (1 + .12 * np.sin(70 * u + 6 * np.sin(9 * v)) + .05 * pores)[..., None]
    body = np.zeros_like(u)  # where the light model applies: head, hair, neck

    def paint(alpha, colour, lit=False):
        _paint(img, alpha, colour)
        if lit:
            np.maximum(body, alpha, out=body)

    if i.hair_style == 2:  # long hair, behind the head
        paint(_ellipse(u, v, 0, .12, i.a + .2, i.b + .2, aa) * np.clip((.95 - v) / aa, 0, 1), strands, lit=True)
    clothes_alpha = _ellipse(u, v, 0, i.b + .62, 1.2, .45, aa)
    paint(clothes_alpha, clothes)
    paint(np.clip((i.a * .5 - np.abs(u)) / aa, 0, 1) * np.clip((v - .2) / aa, 0, 1), skin * .85, lit=True)  # neck
    for side in (-1, 1):
        paint(_ellipse(u, v, side * (i.a - .02), i.eye_v + .12, .08, .16, aa), skin * .92, lit=True)  # ears
    half_width = i.a * (1 - i.jaw * np.clip(v / i.b, 0, 1) ** 2)  # (H, W) the jaw narrows to the chin
    paint(np.clip((1 - np.sqrt((u / half_width) ** 2 + (v / i.b) ** 2)) * i.a / aa, 0, 1), skin, lit=True)

    fu = u - .12 * pose.yaw  # inner features slide sideways when the head turns
    for side in (-1, 1):  # cheeks
        paint(.12 * _ellipse(fu, v, side * .3, i.mouth_v - .15, .12, .08, .05), np.float32([.85, .35, .35]))
    shadow_u = .04 * float(np.sign(scene.light[0])) - .02  # nose: side shadow, tip shadow, nostrils
    paint(.1 * _ellipse(fu, v, shadow_u, i.nose_v - .1, i.nose_w * .5, .18, .04), skin * .6)
    paint(.15 * _ellipse(fu, v, 0, i.nose_v + .02, i.nose_w * .8, .04, .02), skin * .55)
    for side in (-1, 1):
        paint(.8 * _ellipse(fu, v, side * i.nose_w * .5, i.nose_v, .03, .018, aa), skin * .35)
    mv = v - i.mouth_v + pose.smile * .04 * ((fu / i.mouth_w) ** 2 - .5)  # a smile lifts the corners
    paint(_ellipse(fu, mv, 0, 0, i.mouth_w, i.mouth_h * (1 + pose.mouth_open), aa), i.lips)
    gap = _ellipse(fu, mv, 0, 0, i.mouth_w * .85, max(i.mouth_h * pose.mouth_open, .006), aa)
    paint(gap, np.float32([.25, .06, .06]) if pose.mouth_open > .1 else i.lips * .55)
    for side in (-1, 1):
        du, dv = (fu - side * i.eye_u) / i.eye_w, (v - i.eye_v) / i.eye_h
        lid = pose.eye_open * (1 - du ** 2)  # almond-shaped opening: |dv| < lid
        eye = np.clip((lid - np.abs(dv)) * i.eye_h / aa, 0, 1) * (np.abs(du) < 1)
        iris_u = side * i.eye_u + pose.gaze * i.eye_w * .4
        paint(.15 * _ellipse(fu, v, side * i.eye_u, i.eye_v - .01, i.eye_w * 1.5, i.eye_h * 2.4, .05), skin * .6)
        paint(eye, np.float32([.92, .9, .88]))
        paint(eye * _ellipse(fu, v, iris_u, i.eye_v, i.eye_h * .85, i.eye_h * .85, aa), i.iris)
        paint(eye * _ellipse(fu, v, iris_u, i.eye_v, i.eye_h * .4, i.eye_h * .4, aa), np.zeros(3, np.float32))
        lashes = np.clip((.3 - np.abs(dv + lid + .15)) * i.eye_h / aa, 0, 1) * (np.abs(du) < 1.05)
        paint(.85 * lashes, np.float32([.1, .07, .06]))
        bu = (fu - side * i.eye_u * 1.05) / (i.eye_w * 1.3)
        half_thickness = i.brow_t * (1 - .4 * bu ** 2) / 2
        brow = np.clip((half_thickness - np.abs(v - i.brow_v + i.brow_arch * (1 - bu ** 2))) / aa, 0, 1)
        paint(.9 * brow * np.clip((1 - np.abs(bu)) * i.eye_w / aa, 0, 1), i.hair * .8)
    if i.hair_style > 0:  # hair on top, down to a hairline that dips at the temples
        hairline = i.hairline + .3 * (u / i.a) ** 4 + .03 * np.sin(14 * u)
        paint(_ellipse(u, v, 0, -.04, i.a + .06, i.b + .1, aa) * np.clip((hairline - v) / aa, 0, 1), strands, lit=True)

    nu, nv = u / (i.a + .1), (v + .05) / (i.b + .15)  # (H, W) the head as an ellipsoid
    normal = np.stack([nu, nv, np.sqrt(np.clip(1 - nu ** 2 - nv ** 2, .02, 1))], -1)  # (H, W, 3)
    shade = scene.ambient + (1 - scene.ambient) * np.clip(normal @ scene.light, 0, 1)  # Lambert
    img *= (1 + body * (shade - 1))[..., None]
    return Face(np.clip(img * scene.gains, 0, 1).astype(np.float32), u, v, ident, pose, np.maximum(body, clothes_alpha))


def camera(img: np.ndarray, scene: Scene, rng) -> Image.Image:
    """Real-camera post-processing, after any forgery, for reals and fakes alike: lens blur,
    sensor noise, JPEG compression (so that compression cannot tell them apart)."""
    if scene.blur > 0:
        img = blur(img, scene.blur)
    img = img + scene.noise * rng.standard_normal(img.shape, dtype=np.float32)
    img = Image.fromarray(np.clip(img * 255 + .5, 0, 255).astype(np.uint8))
    return _jpeg(img, np.clip(scene.quality + rng.integers(-3, 4), 30, 100))


def blur(img, sigma_at_128):  # Gaussian blur of an (H, W, C) image, sigma scaled with the size
    sigma = sigma_at_128 * img.shape[0] / 128
    return ndimage.gaussian_filter(img, (sigma, sigma, 0))


# Landmarks: points of the face's parts in face coordinates (u, v), mapped to pixels by the
# pose. Inner features slide sideways with the yaw, as render_face draws them.

def landmarks(face: Face) -> dict:
    """{part: (K, 2) pixel coordinates (x, y)} of jaw, brows, eyes, nose, mouth and forehead,
    like a landmark detector's 68 (+ forehead) points, on the rendered face."""
    i, p, size = face.ident, face.pose, face.image.shape[0]
    yaw_u = .12 * p.yaw
    vs = np.linspace(i.eye_v, i.b, 9)
    hw = i.a * (1 - i.jaw * np.clip(vs / i.b, 0, 1) ** 2) * np.sqrt(np.clip(1 - (vs / i.b) ** 2, 0, 1))
    jaw = np.concatenate([np.stack([-hw, vs], 1), np.stack([hw[::-1], vs[::-1]], 1)])
    pts = dict(jaw=jaw)
    b = np.linspace(-1, 1, 3)
    for name, side in (("eye_r", -1), ("eye_l", 1)):
        brow = np.stack([side * i.eye_u * 1.05 + b * i.eye_w * 1.3, i.brow_v - i.brow_arch * (1 - b ** 2)], 1)
        eye = np.array([[side * i.eye_u - i.eye_w, i.eye_v], [side * i.eye_u + i.eye_w, i.eye_v],
                        [side * i.eye_u, i.eye_v - i.eye_h * p.eye_open], [side * i.eye_u, i.eye_v + i.eye_h * p.eye_open]])
        pts[name] = np.concatenate([brow, eye]) + [yaw_u, 0]
    pts["nose"] = np.array([[0, i.nose_v - .2], [-i.nose_w * .8, i.nose_v], [i.nose_w * .8, i.nose_v],
                            [0, i.nose_v + .03]]) + [yaw_u, 0]
    mh = i.mouth_h * (1 + p.mouth_open)
    pts["mouth"] = np.array([[-i.mouth_w, i.mouth_v], [i.mouth_w, i.mouth_v], [0, i.mouth_v - mh],
                             [0, i.mouth_v + mh]]) + [yaw_u, 0]
    fu = np.linspace(-1, 1, 5) * (i.eye_u + i.eye_w)
    pts["forehead"] = np.stack([fu + yaw_u, i.brow_v - .12 - .06 * (1 - (fu / (i.eye_u + i.eye_w)) ** 2)], 1)
    c, s = math.cos(p.roll), math.sin(p.roll)
    out = {}
    for name, uv in pts.items():  # face (u, v) -> image [-1, 1] -> pixels
        x = p.cx + p.scale * (c * uv[:, 0] - s * uv[:, 1])
        y = p.cy + p.scale * (s * uv[:, 0] + c * uv[:, 1])
        out[name] = np.stack([(x + 1) * size / 2, (y + 1) * size / 2], 1)
    return out
