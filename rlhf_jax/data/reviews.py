"""An embedded review corpus: short English reviews generated from a seed, no network needed.

Every review has a topic (hotel, restaurant, film, ...) and a latent sentiment `s` in [-1, 1].
Word choice follows `s`: each sentence draws its own polarity near `s` and picks ordinary English
sentiment words from the matching bucket ("wonderful", "good", "okay", "disappointing",
"terrible", ...), so the VADER compound score (our "gold" scorer later) tracks `s` closely.
Reviews near s = 0 are often *mixed* ("The food was good, but the service was slow and rude.").

    generate_reviews(seed, num) -> [{'text': str, 'topic': str, 'sentiment': float}, ...]
    sft_examples(reviews, seed) -> [{'prompt': str, 'response': str}, ...]

SFT convention (used everywhere in rlhf_jax): a prompt never ends with a space and every response
starts with one, so `prompt + response` is the full text. Two kinds of prompt:
    instruction:   'Write a review of the hotel:'   -> ' We stayed at the Seaview ...'
    continuation:  'We stayed at the Seaview for'   -> ' three nights. The room was ...'

Everything is a pure function of the seed (Python's `random.Random` seeded with a string is
stable across runs and platforms). 20k reviews take about a second.
"""

from __future__ import annotations

import random

# ----------------------------------------------------------------------------------------------
# Vocabulary. Topics: a noun for the thing, names, aspects (things the review talks about),
# neutral context sentences (what the reviewer did), and topic-specific verdict verbs.

TOPICS = {
    "hotel": dict(
        names=["the Seaview", "the Grand Harbor Hotel", "the Alpine Lodge", "the Riverside Inn",
               "the Palace Hotel", "the Old Mill Inn", "the Station Hotel", "the Blue Door B&B"],
        aspects=["room", "bed", "staff", "breakfast", "location", "view", "bathroom", "pool",
                 "reception", "wifi"],
        context=["We stayed at {name} for {n} nights.", "I spent a weekend at {name}.",
                 "We booked {name} for a family trip.", "I stayed at {name} for work."],
    ),
    "restaurant": dict(
        names=["Luigi's", "the Golden Dragon", "Casa Maria", "the Corner Bistro",
               "the Green Olive", "Spice Route", "the Harbour Grill", "Tokyo Table"],
        aspects=["food", "service", "pasta", "dessert", "waiter", "menu", "wine list", "steak",
                 "portions", "atmosphere"],
        context=["I had dinner at {name} last week.", "We went to {name} for a birthday.",
                 "We had lunch at {name} on {day}.", "I ate at {name} with friends."],
    ),
    "film": dict(
        names=["The Long Winter", "Midnight Harbor", "Paper Crowns", "The Last Signal",
               "Glass Rivers", "Northern Lights", "A Quiet Storm", "The Clockmaker"],
        aspects=["plot", "acting", "soundtrack", "ending", "dialogue", "cinematography",
                 "lead actor", "pacing", "script", "special effects"],
        context=["I watched {name} on {day}.", "We saw {name} at the cinema.",
                 "I finally watched {name} last night.", "I streamed {name} at home."],
    ),
    "book": dict(
        names=["The Salt Road", "Letters from Nowhere", "The Orchard Keeper", "Small Fires",
               "The Cartographer", "A Year of Rain", "Iron and Ink", "The Quiet Garden"],
        aspects=["story", "writing", "characters", "ending", "prose", "plot", "first chapter",
                 "main character", "dialogue", "pacing"],
        context=["I read {name} over {n} evenings.", "I picked up {name} on a friend's advice.",
                 "Our book club read {name} this month.", "I finished {name} on {day}."],
    ),
    "phone": dict(
        names=["the Nova X2", "the Pixelon 7", "the Aero Lite", "the Zeta Pro",
               "the Orbit S", "the Kestrel 5"],
        aspects=["battery", "screen", "camera", "speaker", "charger", "software", "design",
                 "price", "fingerprint reader", "case"],
        context=["I bought {name} {n} weeks ago.", "I have used {name} for a month.",
                 "I switched to {name} this year.", "My partner gave me {name}."],
    ),
    "headphones": dict(
        names=["the SoundWave 300", "the QuietPods", "the BassLine Pro", "the Aria Buds",
               "the StudioMax 2", "the Echo Loop"],
        aspects=["sound", "bass", "noise cancelling", "battery", "fit", "microphone",
                 "build quality", "ear cushions", "bluetooth connection", "price"],
        context=["I bought {name} for my commute.", "I have worn {name} for {n} weeks.",
                 "I got {name} on sale.", "I use {name} at the gym."],
    ),
    "cafe": dict(
        names=["Bean There", "the Little Cup", "Morning Glory Cafe", "the Daily Grind",
               "Cafe Lumen", "the Book Nook Cafe"],
        aspects=["coffee", "cake", "croissant", "tea", "barista", "music", "seating", "latte",
                 "prices", "sandwich"],
        context=["I stopped at {name} on {day} morning.", "We met at {name} for coffee.",
                 "I worked from {name} for an afternoon.", "I tried {name} for the first time."],
    ),
    "museum": dict(
        names=["the City Museum", "the Museum of Science", "the Harbor Gallery",
               "the Natural History Museum", "the Modern Art House", "the Railway Museum"],
        aspects=["exhibits", "guide", "collection", "audio tour", "gift shop", "layout",
                 "ticket price", "signs", "special exhibition", "cafe"],
        context=["We visited {name} on {day}.", "I spent an afternoon at {name}.",
                 "We took the kids to {name}.", "I went to {name} with my parents."],
    ),
    "laptop": dict(
        names=["the SwiftBook 14", "the Vertex Pro", "the AirLite 13", "the Titan 16",
               "the Carbon Air", "the WorkMate 15"],
        aspects=["keyboard", "screen", "battery", "trackpad", "fan", "speakers", "performance",
                 "price", "weight", "webcam"],
        context=["I bought {name} for university.", "I have used {name} for {n} months.",
                 "My office gave me {name}.", "I upgraded to {name} this spring."],
    ),
    "concert": dict(
        names=["the Harbor Quartet", "The Midnight Owls", "Lena Ray", "the City Orchestra",
               "Blue Anchor", "The Paper Kites"],
        aspects=["sound", "venue", "band", "setlist", "crowd", "encore", "lighting", "singer",
                 "opening act", "tickets"],
        context=["I saw {name} live on {day}.", "We went to see {name} last month.",
                 "I got tickets to {name} for my birthday.", "We saw {name} at the park."],
    ),
}

DAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]
NUMBERS = ["two", "three", "four", "five", "six"]

# Sentiment buckets, from most negative (0) to most positive (4). Every word is one VADER knows
# (or a negated positive, which VADER also scores), so the gold scorer can read the sentiment.
ADJECTIVES = [
    ["terrible", "awful", "horrible", "dreadful", "disgusting", "a complete disaster",
     "the worst I have seen", "pathetic", "miserable", "useless"],
    ["disappointing", "poor", "bad", "lousy", "boring", "weak", "annoying",
     "unpleasant", "dull"],
    ["okay", "fine", "average", "not bad", "acceptable", "ordinary", "alright", "fair"],
    ["good", "nice", "pleasant", "enjoyable", "solid", "charming", "lovely", "great"],
    ["wonderful", "excellent", "amazing", "fantastic", "superb", "perfect", "outstanding",
     "brilliant", "delightful", "fabulous"],
]
INTENSIFIERS = [["absolutely ", "truly ", "just ", ""], ["", "rather ", "quite "], [""],
                ["", "very ", "quite "], ["absolutely ", "truly ", "really ", ""]]

OPENERS = [
    ["I hated {obj}.", "What a waste of money.", "I regret choosing {obj}.",
     "Avoid {obj} at all costs.", "This was a horrible experience."],
    ["I was disappointed by {obj}.", "Sadly, {obj} let me down.", "I expected more from {obj}.",
     "Not a great experience."],
    ["{Obj} was okay, nothing special.", "I have mixed feelings about {obj}.",
     "{Obj} was fine, I suppose."],
    ["I liked {obj}.", "{Obj} was a pleasant surprise.", "I enjoyed {obj}.",
     "A good experience overall."],
    ["I loved {obj}!", "What a wonderful {topic}!", "{Obj} is simply fantastic.",
     "This was a great experience.", "Best {topic} I have tried in years."],
]
VERDICTS = [
    ["I would never recommend it.", "Never again.", "Zero stars if I could.",
     "Overall, a terrible {topic}.", "A total waste of money."],
    ["I would not recommend it.", "Two stars.", "Overall, a disappointing {topic}.",
     "Worse than I expected."],
    ["Three stars.", "It was an okay {topic}.", "Not bad, not great.", "Worth a try, maybe."],
    ["I would recommend it.", "Four stars.", "Overall, a good {topic}.",
     "Better than I expected."],
    ["Highly recommended!", "Five stars.", "I would happily recommend it to everyone.",
     "Overall, a wonderful {topic}.", "I can't wait to go back."],
]
ASPECT_TEMPLATES = [
    "The {aspect} {was} {intens}{adj}.",
    "I found the {aspect} {intens}{adj}.",
    "The {aspect} felt {intens}{adj}.",
    "Honestly, the {aspect} {was} {intens}{adj}.",
]
MIXED_TEMPLATES = [
    "The {a1} {was1} {adj1}, but the {a2} {was2} {adj2}.",
    "The {a1} {was1} {adj1}; the {a2}, however, {was2} {adj2}.",
    "Although the {a1} {was1} {adj1}, the {a2} {was2} {adj2}.",
]
PLURAL_ASPECTS = {"exhibits", "portions", "prices", "signs", "special effects", "ear cushions",
                  "speakers", "characters", "tickets"}


def _was(aspect: str) -> str:
    return "were" if aspect in PLURAL_ASPECTS else "was"

TOPIC_NOUN = {"headphones": "pair of headphones"}  # "a wonderful pair of headphones"
TOPIC_OBJECT = {"hotel": "this hotel", "restaurant": "this restaurant", "film": "this film",
                "book": "this book", "phone": "this phone", "headphones": "these headphones",
                "cafe": "this cafe", "museum": "this museum", "laptop": "this laptop",
                "concert": "this concert"}


def _bucket(polarity: float) -> int:
    """Map a polarity in [-1, 1] to a sentiment bucket 0 (very negative) .. 4 (very positive)."""
    edges = (-0.6, -0.2, 0.2, 0.6)
    return sum(polarity > e for e in edges)


def _adjective(rng: random.Random, bucket: int) -> str:
    return rng.choice(INTENSIFIERS[bucket]) + rng.choice(ADJECTIVES[bucket])


def _clip(x: float) -> float:
    return max(-1.0, min(1.0, x))


def _review(rng: random.Random) -> dict:
    topic = rng.choice(sorted(TOPICS))
    vocab = TOPICS[topic]
    sentiment = rng.uniform(-1.0, 1.0)
    num_sentences = rng.choice([1, 2, 2, 3, 3, 4])
    fill = dict(name=rng.choice(vocab["names"]), n=rng.choice(NUMBERS), day=rng.choice(DAYS),
                obj=TOPIC_OBJECT[topic], topic=TOPIC_NOUN.get(topic, topic))
    fill["Obj"] = fill["obj"][0].upper() + fill["obj"][1:]

    def polarity() -> float:  # each sentence draws its own polarity near the latent sentiment
        return _clip(sentiment + rng.gauss(0.0, 0.25))

    sentences = []
    if num_sentences >= 2 and rng.random() < 0.6:
        sentences.append(rng.choice(vocab["context"]).format(**fill))
    elif rng.random() < 0.3:
        sentences.append(rng.choice(OPENERS[_bucket(polarity())]).format(**fill))
    aspects = rng.sample(vocab["aspects"], k=len(vocab["aspects"]))
    want_verdict = num_sentences >= 3 and rng.random() < 0.6
    while len(sentences) < num_sentences - int(want_verdict):
        if abs(sentiment) < 0.5 and rng.random() < 0.4:
            # Mixed sentence: the clause after "but" carries the overall direction.
            bad, good = rng.choice([0, 1]), rng.choice([3, 4])
            first, second = (bad, good) if sentiment >= 0 else (good, bad)
            a1, a2 = aspects.pop(), aspects.pop()
            sentences.append(rng.choice(MIXED_TEMPLATES).format(
                a1=a1, a2=a2, was1=_was(a1), was2=_was(a2),
                adj1=rng.choice(ADJECTIVES[first]), adj2=rng.choice(ADJECTIVES[second])))
        else:
            bucket = _bucket(polarity())
            aspect = aspects.pop()
            sentences.append(rng.choice(ASPECT_TEMPLATES).format(
                aspect=aspect, was=_was(aspect), intens=rng.choice(INTENSIFIERS[bucket]),
                adj=rng.choice(ADJECTIVES[bucket])))
    if want_verdict:
        sentences.append(rng.choice(VERDICTS[_bucket(polarity())]).format(**fill))
    return {"text": " ".join(sentences), "topic": topic, "sentiment": float(sentiment)}


def generate_reviews(seed: int | str, num: int) -> list[dict]:
    """`num` reviews, a pure function of `seed`: [{'text', 'topic', 'sentiment'}, ...]."""
    rng = random.Random(f"reviews/{seed}")
    return [_review(rng) for _ in range(num)]


def review_splits(seed: int, num_train: int, num_validation: int) -> dict[str, list[dict]]:
    """Train and validation reviews from one seed; validation texts never occur in train."""
    train = generate_reviews(f"{seed}/train", num_train)
    seen = {r["text"] for r in train}
    rng = random.Random(f"reviews/{seed}/validation")
    validation = []
    while len(validation) < num_validation:
        review = _review(rng)
        if review["text"] not in seen:
            seen.add(review["text"])
            validation.append(review)
    return {"train": train, "validation": validation}


INSTRUCTIONS = ["Write a review of the {topic}:", "Review the {topic}:",
                "Write a short review of a {topic}:", "What did you think of the {topic}?",
                "Tell us about the {topic}:", "Share your opinion of the {topic}:"]


def sft_examples(reviews: list[dict], seed: int | str) -> list[dict]:
    """One (prompt, response) pair per review; half instructions, half continuations.

    The prompt never ends with a space; the response always starts with one.
    Continuation prompts are the first 2..(n-1) words of the review (n = number of words).
    """
    rng = random.Random(f"sft/{seed}")
    examples = []
    for review in reviews:
        words = review["text"].split(" ")
        if rng.random() < 0.5 or len(words) < 4:
            prompt = rng.choice(INSTRUCTIONS).format(topic=review["topic"])
            examples.append({"prompt": prompt, "response": " " + review["text"]})
        else:
            cut = rng.randint(2, min(len(words) - 1, 12))
            examples.append({"prompt": " ".join(words[:cut]),
                             "response": " " + " ".join(words[cut:])})
    return examples
