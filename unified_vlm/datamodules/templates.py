"""Text templates and the three task records per watch (docs/paper.md sections 1.2 and 1.3).

Each record draws its text from its own RNG keyed by ``(*rng_seed_key, task)``, so keeping only
some tasks never changes the text of the others, and the generation prompt and the caption of
one watch are sampled independently.

``wording`` selects the paraphrase pools: ``base`` (the pools below, the default), ``alt`` (a
disjoint set of other paraphrases of the same questions, caption prompts and generation
requests, for testing a model on wording it never saw) or ``all`` (both). Only the pool changes;
the RNG draws are the same, so the same watch asks about the same attributes in every wording.
"""
from __future__ import annotations

import random
import re
from typing import Callable

from unified_vlm.datamodules.watch import WatchAttributes, stable_rng
from unified_vlm.tokens import IMAGE_MARKER

TASKS = ("generation", "vqa", "caption")

# --- VQA (1.2b): 9 weather, 10 time, 10 battery, 10 battery-position, 10 weather-position questions.
WEATHER_QUESTIONS = (
    "What is the weather shown on the watch?",
    "What weather does the watch display?",
    "What is the weather condition on the watch?",
    "Which weather icon is shown on the watch?",
    "What kind of weather is displayed?",
    "How is the weather according to the watch?",
    "What does the weather icon on the watch show?",
    "What weather is indicated on the smart watch?",
    "What is the current weather on the watch screen?",
)
TIME_QUESTIONS = (
    "What time is it?",
    "What time does the watch show?",
    "What is the time on the watch?",
    "What time is displayed on the watch?",
    "Can you tell me the time shown on the watch?",
    "What time do the hands of the watch indicate?",
    "Read the time on the watch. What is it?",
    "What is the current time according to the watch?",
    "What time is shown on this smart watch?",
    "What time do the watch hands point to?",
)
BATTERY_QUESTIONS = (
    "What is the battery level?",
    "How much battery is left?",
    "What battery percentage does the watch show?",
    "What is the battery level of the watch?",
    "How much charge does the watch have?",
    "What percentage is shown on the battery indicator?",
    "How full is the battery?",
    "What is the remaining battery of the watch?",
    "What does the battery indicator read?",
    "How much power is left on the watch?",
)
BATTERY_POSITION_QUESTIONS = (
    "Where is the battery indicator located?",
    "Where is the battery shown?",
    "In which corner is the battery indicator?",
    "Where can the battery level be found in the image?",
    "Which corner of the image shows the battery?",
    "Where is the battery icon placed?",
    "Where is the battery percentage displayed?",
    "In which corner does the battery indicator appear?",
    "Where is the battery status shown in the image?",
    "What is the position of the battery indicator?",
)
WEATHER_POSITION_QUESTIONS = (
    "Where is the weather icon located?",
    "Where is the weather shown?",
    "In which corner is the weather icon?",
    "Where can the weather be found in the image?",
    "Which corner of the image shows the weather?",
    "Where is the weather indicator placed?",
    "Where is the weather information displayed?",
    "In which corner does the weather icon appear?",
    "Where is the weather status shown in the image?",
    "What is the position of the weather icon?",
)
WHAT_ATTRIBUTES = ("weather", "time", "battery")
WHERE_ATTRIBUTES = ("battery_pos", "weather_pos")
QUESTIONS = {
    "weather": WEATHER_QUESTIONS,
    "time": TIME_QUESTIONS,
    "battery": BATTERY_QUESTIONS,
    "battery_pos": BATTERY_POSITION_QUESTIONS,
    "weather_pos": WEATHER_POSITION_QUESTIONS,
}
WHAT_PROBABILITY = 3 / 5  # otherwise "where": each of the 5 attributes is asked with p = 1/5
EXTRA_QA_TRIALS = 3
EXTRA_QA_PROBABILITY = 0.4  # 1 + 3 * 0.4 = 2.2 QA turns on average

# --- Generation (1.2a): base requests; acknowledgements end with the image placeholder.
GENERATION_REQUESTS = (
    "can you generate an image of a smart watch",
    "can you draw a smart watch",
    "please show a smart watch",
)
GENERATION_ACKNOWLEDGEMENTS = (
    f"Sure, here is the image.\n{IMAGE_MARKER}",
    f"Of course! Here is the smart watch you asked for.\n{IMAGE_MARKER}",
    f"Here is the generated image.\n{IMAGE_MARKER}",
)

# --- Caption (1.2c): prompts start with the image placeholder; one base keeps the paper's typo.
CAPTION_PROMPTS = tuple(
    f"{IMAGE_MARKER}\n{prompt}"
    for prompt in (
        "Describe the key elements of this watch.",
        "Describe the key elements of this watch UI.",
        "What does this smart watch show? Describe it.",
        "Give a short description of the watch in the image.",
        "Describe what is displayed on this smart watch.",
        "Summarize the information shown on this watch.",
        "Describe this smart watch interface.",
        "Write a caption for this watch image.",
        "What are the main elements of this watch screen?",
        "Briefly describe the watch and its display.",
    )
)
CAPTION_BASES = (
    "the image shows a smart watch",
    "this is a smart watch",
    "the image is show a smart watch",  # the paper's typo, kept on purpose
)

# --- Alternative wording (never in the base pools): the same questions and requests, said otherwise.
ALT_QUESTIONS = {
    "weather": (
        "Which forecast is on the display?",
        "Tell me the weather the watch reports.",
        "Is it sunny, cloudy or raining on this watch?",
        "What weather symbol can you see?",
        "Name the weather on the screen.",
        "What does the forecast icon say?",
        "Which weather is the device reporting?",
        "What is the forecast shown here?",
        "Identify the weather on this display.",
    ),
    "time": (
        "Which time is on the clock face?",
        "Tell me the hour, minute and second shown.",
        "What does the clock read?",
        "Give the time that this watch face shows.",
        "At what time are the hands set?",
        "Report the time on this display.",
        "What is the reading of the clock hands?",
        "Which hour, minute and second does the dial show?",
        "State the time on the dial.",
        "What time can be read from this face?",
    ),
    "battery": (
        "How charged is the device?",
        "Tell me the charge level.",
        "What charge percentage can you read?",
        "Which percentage does the power indicator show?",
        "How much energy does the device have left?",
        "Report the battery charge.",
        "What does the charge indicator say?",
        "At what percentage is the battery?",
        "State the remaining charge.",
        "Read the battery gauge. What is it?",
    ),
    "battery_pos": (
        "Which corner holds the charge indicator?",
        "Tell me where the power gauge is.",
        "In what corner can you see the battery gauge?",
        "Where on the screen is the charge shown?",
        "Locate the battery gauge.",
        "At which corner is the power level drawn?",
        "Where does the charge percentage sit?",
        "Which corner has the battery bar?",
        "Point out the corner of the battery gauge.",
        "Where is the power indicator drawn?",
    ),
    "weather_pos": (
        "Which corner holds the forecast symbol?",
        "Tell me where the weather symbol is.",
        "In what corner can you see the forecast?",
        "Where on the screen is the weather drawn?",
        "Locate the weather symbol.",
        "At which corner is the forecast shown?",
        "Where does the weather symbol sit?",
        "Which corner has the forecast icon?",
        "Point out the corner of the weather symbol.",
        "Where is the forecast indicator drawn?",
    ),
}
ALT_GENERATION_REQUESTS = (
    "create a picture of a smart watch",
    "render a smart watch for me",
    "i would like an image of a smart watch",
)
ALT_CAPTION_PROMPTS = tuple(
    f"{IMAGE_MARKER}\n{prompt}"
    for prompt in (
        "What can you see on this device?",
        "Tell me everything this watch face displays.",
        "List what the screen of this watch shows.",
        "Explain the contents of this watch display.",
        "Caption this picture of a watch.",
        "What information does this device show?",
        "Report the elements visible on this watch.",
        "Give a one-sentence account of this watch face.",
        "What is on this watch screen?",
        "Write a short description of this device's display.",
    )
)
WORDINGS = ("base", "alt", "all")


def _pool(base: tuple[str, ...], alt: tuple[str, ...], wording: str) -> tuple[str, ...]:
    if wording == "base":
        return base
    if wording == "alt":
        return alt
    if wording == "all":
        return base + alt
    raise ValueError(f"wording must be one of {WORDINGS}, got {wording!r}")


# --- Clause builder (1.3): attribute -> (inclusion probability, phrasings).
CLAUSES: dict[str, tuple[float, tuple[str, ...]]] = {
    "time": (1.0, ("showing the time {time}", "with the time {time}", "the time is {time}", "displaying {time}")),
    "weather": (0.5, ("showing {weather} weather", "with the weather being {weather}", "with a {weather} weather icon")),
    "battery": (0.5, ("with {battery}% battery", "battery level at {battery}%", "with a battery of {battery}%")),
    "weather_pos": (0.5, (
        "with weather displayed at {weather_pos}",
        "weather icon at the {weather_pos} corner",
        "with the weather shown in the {weather_pos} corner",
    )),
    "battery_pos": (0.5, (
        "battery indicator at {battery_pos}",
        "with the battery shown in the {battery_pos} corner",
        "battery displayed at the {battery_pos} corner",
    )),
}


def answer(attrs: WatchAttributes, attribute: str) -> str:
    """The bare answer value the paper uses: weather word, HH:MM:SS, N%, or corner name."""
    values: dict[str, Callable[[], str]] = {
        "weather": lambda: attrs.weather,
        "time": attrs.time_str,
        "battery": lambda: f"{attrs.battery}%",
        "battery_pos": lambda: attrs.battery_pos,
        "weather_pos": lambda: attrs.weather_pos,
    }
    return values[attribute]()


def postprocess(text: str) -> str:
    """The paper's clean-up: collapse double spaces, str.capitalize(), drop a trailing comma, add '.'."""
    text = re.sub(r" {2,}", " ", text).strip().capitalize()
    return text.rstrip(",") + "."


PROMPTS = ("paper", "all")  # generation prompts: the paper's clause draw, or every attribute stated
QUESTION_MIXES = ("paper", "position")  # VQA turns: the paper's draw, or corner questions only


def describe(attrs: WatchAttributes, base: str, rng: random.Random, every: bool = False) -> str:
    """``base`` plus one ", <clause>" per included attribute, post-processed (1.3).

    ``every`` states every attribute (a curriculum's prompts) instead of the paper's draw; the
    phrasings come from the same pools, so a model trained on them reads the paper's prompts.
    """
    fields = {
        "time": attrs.time_str(),
        "weather": attrs.weather,
        "battery": attrs.battery,
        "weather_pos": attrs.weather_pos,
        "battery_pos": attrs.battery_pos,
    }
    text = base
    for probability, phrasings in CLAUSES.values():
        if every or rng.random() < probability:
            text += ", " + rng.choice(phrasings).format(**fields)
    return postprocess(text)


def vqa_conversation(attrs: WatchAttributes, rng: random.Random, wording: str = "base", questions: str = "paper") -> list[dict]:
    """1 to 4 QA pairs: one always, then 3 trials at p=0.4; 'what' p=3/5, 'where' p=2/5.

    ``questions="position"`` asks only 'where' questions (same turn counts): a curriculum's
    warm-up, where a fresh model finds the question-times-image product in a few hundred steps.
    """
    if questions not in QUESTION_MIXES:
        raise ValueError(f"questions must be one of {QUESTION_MIXES}, got {questions!r}")
    n_pairs = 1 + sum(rng.random() < EXTRA_QA_PROBABILITY for _ in range(EXTRA_QA_TRIALS))
    turns = []
    for k in range(n_pairs):
        what = rng.random() < WHAT_PROBABILITY and questions == "paper"
        pool = WHAT_ATTRIBUTES if what else WHERE_ATTRIBUTES
        attribute = rng.choice(pool)
        question = rng.choice(_pool(QUESTIONS[attribute], ALT_QUESTIONS[attribute], wording))
        if k == 0:
            question = f"{IMAGE_MARKER}\n{question}"
        turns += [{"from": "human", "value": question}, {"from": "gpt", "value": answer(attrs, attribute)}]
    return turns


def generation_conversation(attrs: WatchAttributes, rng: random.Random, wording: str = "base", prompts: str = "paper") -> list[dict]:
    if prompts not in PROMPTS:
        raise ValueError(f"prompts must be one of {PROMPTS}, got {prompts!r}")
    prompt = describe(attrs, rng.choice(_pool(GENERATION_REQUESTS, ALT_GENERATION_REQUESTS, wording)), rng, every=prompts == "all")
    return [{"from": "human", "value": prompt}, {"from": "gpt", "value": rng.choice(GENERATION_ACKNOWLEDGEMENTS)}]


def caption_conversation(attrs: WatchAttributes, rng: random.Random, wording: str = "base") -> list[dict]:
    prompt = rng.choice(_pool(CAPTION_PROMPTS, ALT_CAPTION_PROMPTS, wording))
    return [{"from": "human", "value": prompt}, {"from": "gpt", "value": describe(attrs, rng.choice(CAPTION_BASES), rng)}]


CONVERSATION_BUILDERS = {
    "generation": generation_conversation,
    "vqa": vqa_conversation,
    "caption": caption_conversation,
}


def build_task_record(
    attrs: WatchAttributes, rng_seed_key: tuple, task: str, image: str, watch_id: str, watch_index: int | None = None,
    wording: str = "base", prompts: str = "paper", questions: str = "paper",
) -> dict:
    """One LLaVA-schema record; its text depends only on (attrs, rng_seed_key, task, wording, prompts, questions)."""
    if task not in CONVERSATION_BUILDERS:
        raise ValueError(f"unknown task {task!r}; expected one of {TASKS}")
    rng = stable_rng(*rng_seed_key, task)
    if task == "generation":
        conversations = generation_conversation(attrs, rng, wording, prompts=prompts)
    elif task == "vqa":
        conversations = vqa_conversation(attrs, rng, wording, questions=questions)
    else:
        conversations = CONVERSATION_BUILDERS[task](attrs, rng, wording)
    record = {
        "id": f"{watch_id}-{task}",
        "task": task,
        "image": image,
        "conversations": conversations,
        "attributes": attrs.to_dict(),
    }
    if watch_index is not None:
        record["watch"] = watch_index
    return record


def build_records(
    attrs: WatchAttributes, rng_seed_key: tuple, image: str, watch_id: str, watch_index: int | None = None
) -> list[dict]:
    """The three records [generation, vqa, caption] of one watch, sharing ``image``.

    ``rng_seed_key`` is normally ``(seed, split, index)``; ``watch_index``, when given, is stored
    as the record's ``"watch"`` field.
    """
    return [build_task_record(attrs, rng_seed_key, task, image, watch_id, watch_index) for task in TASKS]
