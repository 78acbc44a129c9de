"""Which face detector extract.py should use: dlib's HOG or OpenCV's Haar cascade, as extract.py
configures them, on the real photographs that packages ship (README "From videos").

    pip install -r video/requirements.txt scikit-image && python -m video.compare_detectors

Photographs: scikit-image's astronaut (Eileen Collins) and matplotlib's grace_hopper.jpg, each
with its face region marked by eye; scikit-image's lfw_subset, 100 face crops and 100 background
crops of 25 x 25 px from Labeled Faces in the Wild, upscaled (bicubic) to a face of 100 or 50 px,
upright or tilted by 20 degrees, in a 200 x 200 frame padded with the crop's edge pixels.
A photograph counts as found when the largest box's centre lies in the marked region; an lfw
crop when any box is found (on a background crop, that is a false positive). Time: per 960 x 540
frame of a moving face (grace_hopper.jpg over a textured background), CPU seconds of this process.
"""
import time

import matplotlib.cbook
import numpy as np
from PIL import Image

from video import extract

try:
    from skimage import data as skdata  # its photographs: astronaut and lfw_subset
except ImportError:
    raise SystemExit("compare_detectors.py needs scikit-image for its photographs: pip install scikit-image") from None

ASTRONAUT, ASTRONAUT_FACE = skdata.astronaut(), (180, 70, 260, 160)  # (x0, y0, x1, y1): hairline to chin
GRACE = np.asarray(Image.open(matplotlib.cbook.get_sample_data("grace_hopper.jpg", asfileobj=False)).convert("RGB"))
GRACE_FACE = (175, 140, 360, 315)  # brim of the cap to chin, ear to ear
LFW = skdata.lfw_subset()  # (200, 25, 25) in [0, 1]: 100 faces, then 100 backgrounds


def lfw_frame(crop, side, angle=0):
    """A 25 x 25 crop upscaled to side x side, tilted, centred in a 200 x 200 RGB frame."""
    face = Image.fromarray((crop * 255).round().astype(np.uint8)).resize((side, side), Image.BICUBIC)
    face = np.asarray(face.rotate(angle, Image.BICUBIC) if angle else face)
    pad = (200 - side) // 2
    return np.repeat(np.pad(face, (pad, 200 - side - pad), mode="edge")[..., None], 3, axis=2)


def moving_face_frames(n=16, width=960, height=540):
    rng = np.random.default_rng(0)
    background = np.asarray(Image.fromarray(rng.integers(40, 200, (height // 8, width // 8, 3), dtype=np.uint8))
                            .resize((width, height), Image.BICUBIC))
    face = np.asarray(Image.fromarray(GRACE).resize((307, 360), Image.BICUBIC))
    frames = []
    for k in range(n):
        f = background.copy()
        x = round((width - 307) * k / (n - 1))
        f[90:450, x:x + 307] = face
        frames.append(f)
    return frames


def found_in(image, region, detect):
    box = extract.largest_face(image, detect)
    if box is None:
        return False
    x, y = box[0] + box[2] / 2, box[1] + box[3] / 2  # the box's centre
    return region[0] <= x <= region[2] and region[1] <= y <= region[3]


def main():
    print("| detector | astronaut | grace_hopper | lfw faces, 100 px | lfw faces, 50 px | tilted +20° "
          "| tilted −20° | false positives on 100 lfw backgrounds | ms per 960×540 frame |")
    print("|---|---|---|---|---|---|---|---|---|")
    frames = moving_face_frames()
    for name in ("dlib", "haar"):
        detect = extract.load_detector(name)
        hits = [sum(bool(detect(lfw_frame(c, side, angle))) for c in LFW[:100])
                for side, angle in ((100, 0), (50, 0), (100, 20), (100, -20))]
        false = sum(bool(detect(lfw_frame(c, 100))) for c in LFW[100:])
        start = time.process_time()
        found = sum(extract.largest_face(f, detect) is not None for f in frames)
        ms = (time.process_time() - start) / len(frames) * 1e3
        print(f"| {name} | {'found' if found_in(ASTRONAUT, ASTRONAUT_FACE, detect) else 'missed'} "
              f"| {'found' if found_in(GRACE, GRACE_FACE, detect) else 'missed'} | "
              + " | ".join(f"{h}/100" for h in hits) + f" | {false}/100 | {ms:.0f} ({found}/{len(frames)} found) |")


if __name__ == "__main__":
    main()
