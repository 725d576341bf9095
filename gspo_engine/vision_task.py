"""Built-in image tasks for the tiny-vl model (`data.dataset: builtin_vision`), drawn with PIL from a seed.

- colour: one shape (square, disc or triangle, of random size and place) in one of COLOURS on a white
  image; the answer is the colour's digit: `<image><colour>=` -> `2` for green.
- count: one to four small squares of random colours; the answer is how many.

Rows are `{"prompt", "images": [PIL image], "answer", "task"}`, rewarded by digit_match like the digit
tasks; the images go through the model's image processor like a dataset's files.
"""

from __future__ import annotations

import random

from PIL import Image, ImageDraw

from gspo_engine.builtin_tasks import SEPARATOR
from gspo_engine.config import VISION_TASKS
from gspo_engine.vision_prompts import IMAGE_MARKER

# Digit answer -> colour drawn; far apart in RGB so that the colour survives any resizing.
COLOURS = {"1": (220, 30, 30), "2": (30, 180, 30), "3": (30, 60, 220), "4": (230, 200, 20)}
IMAGE_SIZE = 48  # pixels per side of a drawn image


def vision_prompt(task: str) -> str:
    return f"{IMAGE_MARKER}<{task}>{SEPARATOR}"


def draw_colour(rng: random.Random) -> tuple[Image.Image, str]:
    answer = rng.choice(sorted(COLOURS))
    image = Image.new("RGB", (IMAGE_SIZE, IMAGE_SIZE), "white")
    draw = ImageDraw.Draw(image)
    side = rng.randint(IMAGE_SIZE // 2, IMAGE_SIZE - 4)
    left, top = rng.randint(0, IMAGE_SIZE - side), rng.randint(0, IMAGE_SIZE - side)
    box = (left, top, left + side - 1, top + side - 1)
    shape = rng.choice(("square", "disc", "triangle"))
    if shape == "square":
        draw.rectangle(box, fill=COLOURS[answer])
    elif shape == "disc":
        draw.ellipse(box, fill=COLOURS[answer])
    else:
        draw.polygon([(left, top + side - 1), (left + side - 1, top + side - 1), (left + side // 2, top)],
                     fill=COLOURS[answer])
    return image, answer


def draw_count(rng: random.Random) -> tuple[Image.Image, str]:
    count = rng.randint(1, 4)
    image = Image.new("RGB", (IMAGE_SIZE, IMAGE_SIZE), "white")
    draw = ImageDraw.Draw(image)
    cell = IMAGE_SIZE // 2
    for quadrant in rng.sample(range(4), count):  # one square per quadrant, so none overlap
        side = rng.randint(cell // 2, cell - 4)
        left = (quadrant % 2) * cell + rng.randint(0, cell - side)
        top = (quadrant // 2) * cell + rng.randint(0, cell - side)
        draw.rectangle((left, top, left + side - 1, top + side - 1), fill=COLOURS[rng.choice(sorted(COLOURS))])
    return image, str(count)


DRAW = {"colour": draw_colour, "count": draw_count}


def generate_vision_rows(tasks: tuple[str, ...], count: int, seed: int) -> list[dict]:
    """`count` rows, the same for the same tasks and seed."""
    unknown = sorted(set(tasks) - set(VISION_TASKS))
    if not tasks or unknown:
        raise ValueError(f"vision tasks must be some of {', '.join(VISION_TASKS)}, got {list(tasks)}")
    rng = random.Random(seed)
    rows = []
    for _ in range(count):
        task = rng.choice(tasks)
        image, answer = DRAW[task](rng)
        rows.append({"prompt": vision_prompt(task), "images": [image], "answer": answer, "task": task})
    return rows
