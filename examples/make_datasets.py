"""Writes the two demo datasets (deterministic; re-run to regenerate the committed files).

tone/     phrase -> one of five tone labels (label task: accuracy, macro F1)
extract/  booking request -> one-line JSON with city, date and guests (structured free text: ROUGE-L, BLEU, exact match)

Each has three splits: ``train.jsonl`` (training), ``eval.jsonl`` (evaluation during training, early
stopping and best-checkpoint selection) and ``test.jsonl``, which neither training nor checkpoint
selection sees: the quality figures the README reports. Tone's eval rows share their base phrase
with a training row (another opener/ending); its test rows are new sentences (TONE_TEST_PHRASES),
so they measure the task, not the memorised phrase. Extract's test rows are new requests drawn from
the same generator, none equal to a train or eval request. The test rows come from their own
random stream, so train.jsonl and eval.jsonl are byte-identical to before the split existed.
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
# Test-only sentences: no overlap with TONE_PHRASES (checked in main()).
TONE_TEST_PHRASES = {
    "joy": [
        "my daughter took her first steps", "we finally paid off the house", "the band played my favourite song",
        "I got a hug from every kid in class", "the new kitten curled up on my lap", "our offer on the flat was accepted",
        "I beat my best time in the marathon", "my friends surprised me with a picnic", "the harvest was the best in years",
        "my brother is coming home from the army", "the children laughed all afternoon", "I finished painting the kitchen",
        "we danced until the sun came up", "the doctor said I am fully healed", "my poem won first prize",
        "the whole street sang together", "I learned to ride a bike at forty", "we adopted a lovely old dog",
        "the bakery saved me the last croissant", "our little team won the cup",
    ],
    "sadness": [
        "my best friend forgot about me", "the last letter from my mother is fading", "we sold the family farm",
        "my son will not call me anymore", "the school I loved is being closed", "I could not say goodbye to him",
        "her chair at the table stays empty", "the band I grew up with split up", "I failed the course a second time",
        "the kids have all moved far away", "my old dog can barely walk now", "nobody remembered the anniversary",
        "the photos of our wedding were lost in the flood", "I eat dinner alone every night", "my team lost the final",
        "the town where I grew up is gone", "he did not come to the funeral", "my savings are gone",
        "the hospital called with bad news", "I had to give away my cat",
    ],
    "anger": [
        "the mechanic charged me for work he never did", "my roommate ate my food again", "they gave my seat to someone else",
        "the bank froze my account without warning", "he cut in front of the whole queue", "the builders left a mess in my garden",
        "my boss blamed me for his mistake", "the airline lost my bag and shrugged", "someone dumped rubbish on my lawn",
        "they raised the rent for the third time this year", "the shop refused to refund a broken phone", "my brother crashed my car and lied",
        "the hotel gave away our booked room", "the council ignored every complaint", "the taxi driver took the long way on purpose",
        "they kept me on hold for an hour", "my emails were read without permission", "the plumber never showed up again",
        "the waiter was rude to my mother", "the neighbours parked across my gate",
    ],
    "fear": [
        "the bridge started swaying under us", "I found a snake in my sleeping bag", "the car skidded on the black ice",
        "there is a lump the doctor wants to check", "the boat is taking on water", "someone is trying the door handle",
        "the kids are lost in the crowd", "the elevator stopped between floors", "the wildfire is a mile from our house",
        "I have to jump from the high board", "the surgeon said the operation is risky", "the ground started shaking at night",
        "a man with a knife was seen on our street", "the pilot announced an emergency landing", "my heart keeps racing for no reason",
        "the tent is flapping in the hurricane", "I am lost in the mountains as it gets dark", "the dog broke its leash and is charging",
        "the water in the cave keeps rising", "I heard glass break downstairs",
    ],
    "surprise": [
        "my quiet neighbour is a famous author", "the old painting in the attic is worth millions", "my twin turned up at my door",
        "the bus came exactly on time", "a stranger paid for my groceries", "it turns out the cake was made of ice cream",
        "my grandmother started a rock band", "the test I feared was easy", "the parrot said my name",
        "I won a raffle I forgot I entered", "the lost ring was inside the vacuum cleaner", "my boss gave everyone Friday off",
        "the shy intern proposed at the party", "a whale swam right past our boat", "the locked door was open all along",
        "my childhood friend is my new manager", "the restaurant remembered my order from years ago", "the storm missed us completely",
        "we got upgraded to first class", "the new teacher is my cousin",
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


def tone_test_rows(rng: random.Random) -> list[dict[str, str]]:
    """One row per test-only sentence, with an opener and ending as in training."""
    rows = []
    for tone, phrases in TONE_TEST_PHRASES.items():
        for phrase in phrases:
            endings = [e for e in TONE_ENDINGS if not (e == " today." and re.search(r"today|tonight|night|morning|tomorrow", phrase))]
            text = f"{rng.choice(TONE_OPENERS_OK[tone])}{phrase}{rng.choice(endings)}"
            rows.append({"phrase": text[0].upper() + text[1:], "tone": tone})
    rng.shuffle(rows)
    return rows


def extract_rows(rng: random.Random, count: int = 320, seen: set[str] | None = None) -> list[dict[str, str]]:
    rows = []
    seen = set() if seen is None else seen
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
    # Test splits: their own random stream, so the files above do not change.
    test_rng = random.Random(4321)
    known = {p for phrases in TONE_PHRASES.values() for p in phrases}
    overlap = known & {p for phrases in TONE_TEST_PHRASES.values() for p in phrases}
    assert not overlap, f"test phrases also in training: {overlap}"
    tone_test = tone_test_rows(test_rng)
    write_jsonl(HERE / "tone" / "test.jsonl", tone_test)
    extract_test = extract_rows(test_rng, 100, seen={r["request"][0].lower() + r["request"][1:] for r in extract}
                                | {r["request"] for r in extract})
    write_jsonl(HERE / "extract" / "test.jsonl", extract_test)
    print(f"tone: {len(tone)} + {len(tone_test)} test rows, extract: {len(extract)} + {len(extract_test)} test rows")


if __name__ == "__main__":
    main()
