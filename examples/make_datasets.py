"""Writes the two demo datasets (deterministic; re-run to regenerate the committed files).

tone/     phrase -> one of five tone labels (label task: accuracy, macro F1)
extract/  booking request -> one-line JSON with city, date and guests (structured free text: ROUGE-L, BLEU, exact match)
"""

from __future__ import annotations

import json
import random
import re
from pathlib import Path

HERE = Path(__file__).parent

TONE_PHRASES = {
    "joy": [
        "I finally got the job I wanted", "we won the championship last night", "my sister just had a healthy baby girl",
        "the sun is out and the beach is calling", "I passed the exam with top marks", "our team shipped the release on time",
        "grandma loved the cake we baked", "I can't stop smiling after that concert", "the garden is full of flowers this spring",
        "we are going on holiday tomorrow", "my best friend is visiting this weekend", "the puppy learned to sit today",
        "I got tickets to the sold-out show", "the whole family came home for dinner", "my paper was accepted",
    ],
    "sadness": [
        "I miss my old friends so much", "the house feels empty since the dog died", "nobody came to my birthday party",
        "I lost the photos from our last trip", "my grandfather passed away this morning", "we had to say goodbye at the station",
        "the letter said they would not hire me", "it has rained every day and I feel low", "my favourite cafe closed for good",
        "I spent the holidays alone this year", "our team was relegated after ten years", "she moved to another country without me",
        "I keep thinking about what we lost", "the old oak tree was cut down", "my plants all died while I was away",
    ],
    "anger": [
        "they cancelled my flight without telling me", "the landlord kept my deposit for no reason", "someone scratched my new car",
        "I waited two hours and they closed the counter", "my neighbour plays loud music every night", "the company charged me twice",
        "he took credit for my work again", "the delivery was late and broken", "they lied to us about the price",
        "I am furious that nobody fixed the heating", "the referee ignored a clear foul", "my order was wrong for the third time",
        "they towed my car from my own driveway", "the support line hung up on me", "someone stole my bike from the rack",
    ],
    "fear": [
        "I heard footsteps in the empty house", "the plane shook hard during the storm", "the test results come back tomorrow",
        "there is a strange noise coming from the basement", "I have to give a speech to a thousand people", "the lights went out in the forest",
        "the river is rising towards our street", "my child has not come home yet", "the brakes felt soft on the mountain road",
        "I think someone is following me", "the doctor wants to run more tests", "the dog next door is growling at me",
        "the ice on the lake is cracking", "I am alone and the door just opened", "the smoke alarm went off at night",
    ],
    "surprise": [
        "I did not expect to see you here", "they threw me a party I knew nothing about", "the quiet kid won the talent show",
        "my old teacher remembered my name", "it snowed in the middle of summer", "the shop gave me a free upgrade",
        "I found money in my winter coat", "the film ended in a way nobody saw coming", "my brother got engaged overnight",
        "the package arrived a week early", "a famous singer sat next to me on the train", "the exam was cancelled this morning",
        "my cat opened the fridge by herself", "we bumped into each other in another country", "the old radio suddenly started working",
    ],
}
TONE_OPENERS = ["", "Honestly, ", "Wow, ", "Today ", "Guess what: ", "Ugh, ", "Well, "]
TONE_ENDINGS = [".", "!", "...", "!!", " today."]
TONE_OPENERS_OK = {"joy": TONE_OPENERS, "sadness": ["", "Honestly, ", "Today ", "Well, "],
                   "anger": ["", "Honestly, ", "Ugh, ", "Today "], "fear": ["", "Honestly, ", "Today ", "Well, "],
                   "surprise": ["", "Wow, ", "Guess what: ", "Today ", "Honestly, "]}

CITIES = ["Paris", "Berlin", "Madrid", "Rome", "Lisbon", "Vienna", "Prague", "Oslo", "Dublin", "Athens",
          "Tokyo", "Seoul", "Toronto", "Chicago", "Boston", "Sydney", "Nairobi", "Lima", "Cairo", "Warsaw"]
MONTHS = ["January", "February", "March", "April", "May", "June", "July", "August", "September", "October",
          "November", "December"]
NUMBER_WORDS = {1: "one", 2: "two", 3: "three", 4: "four", 5: "five", 6: "six"}
EXTRACT_TEMPLATES = [
    "Book a table for {n} in {city} on {date}.",
    "Can you reserve a room in {city} for {n} people on {date}?",
    "I need a hotel in {city} on {date} for {nw} guests.",
    "Please get us {n} seats at a restaurant in {city}, {date}.",
    "We are {nw} travelling to {city} and arrive {date}; find us a place to stay.",
    "Reservation request: {city}, {date}, party of {n}.",
    "{date} in {city}, table for {nw} please.",
    "Could you book something in {city} for {n} on {date}?",
]


def tone_rows(rng: random.Random) -> list[dict[str, str]]:
    rows = []
    for tone, phrases in TONE_PHRASES.items():
        for phrase in phrases:
            for opener in rng.sample(TONE_OPENERS_OK[tone], 4):
                endings = [e for e in TONE_ENDINGS if not (e == " today." and re.search(r"today|tonight|night|morning|tomorrow", phrase))]
                ending = rng.choice(endings)
                text = f"{opener}{phrase}{ending}"
                rows.append({"phrase": text[0].upper() + text[1:], "tone": tone})
    rng.shuffle(rows)
    return rows


def extract_rows(rng: random.Random, count: int = 320) -> list[dict[str, str]]:
    rows = []
    seen = set()
    while len(rows) < count:
        city, month, day, n = rng.choice(CITIES), rng.choice(MONTHS), rng.randint(1, 28), rng.randint(1, 6)
        template = rng.choice(EXTRACT_TEMPLATES)
        date = f"{month} {day}"
        request = template.format(n=n, nw=NUMBER_WORDS[n], city=city, date=date)
        if request in seen:
            continue
        seen.add(request)
        answer = json.dumps({"city": city, "date": date, "guests": n})
        rows.append({"request": request[0].upper() + request[1:], "json": answer})
    return rows


def write_jsonl(path: Path, rows: list[dict[str, str]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def main() -> None:
    rng = random.Random(1234)
    tone = tone_rows(rng)
    write_jsonl(HERE / "tone" / "train.jsonl", tone[:-50])
    write_jsonl(HERE / "tone" / "eval.jsonl", tone[-50:])
    extract = extract_rows(rng)
    write_jsonl(HERE / "extract" / "train.jsonl", extract[:-50])
    write_jsonl(HERE / "extract" / "eval.jsonl", extract[-50:])
    print(f"tone: {len(tone)} rows, extract: {len(extract)} rows")


if __name__ == "__main__":
    main()
