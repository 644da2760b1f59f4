"""Regenerate the shipped demo data (text.jsonl, chat_sft.jsonl, multimodal.jsonl, images/*.png).

    python apriel_jax/data/demo_data/make_demo_data.py

Deterministic: re-running rewrites byte-identical files, so the committed output can be checked
against this script. All text is original; all images are drawn here with PIL, and each caption in
multimodal.jsonl describes what the matching ``draw_*`` function draws.
"""

from __future__ import annotations

import json
from pathlib import Path

from PIL import Image, ImageDraw

HERE = Path(__file__).resolve().parent

# ------------------------------------------------------------------------------------------- text

PARAGRAPHS = [
    "Bread rises because yeast eats the sugars in flour and releases carbon dioxide. The gas is trapped "
    "by a stretchy network of gluten, and the dough swells. Baking sets that network, leaving the airy "
    "crumb we slice for breakfast.",
    "A lighthouse keeper once had to wind the clockwork that turned the lens every few hours through the "
    "night. Today most lights are automatic, and the keepers' cottages have become museums and guest houses.",
    "To change a bicycle tyre, release the brake, remove the wheel, and lever one side of the tyre off the "
    "rim. Pull out the old tube, check the inside of the tyre for thorns, then fit the new tube with a "
    "little air in it so it does not twist.",
    "Octopuses have three hearts and blue blood. Two hearts pump blood through the gills, and the third "
    "sends it around the rest of the body. Their copper-based blood carries oxygen well in cold water.",
    "The river was low that summer, and the stepping stones we had never seen before made a path across to "
    "the island. My sister went first, arms out like a tightrope walker, and did not look back once.",
    "A good password is long rather than clever. Four or five unrelated words strung together are easier "
    "to remember than a short jumble of symbols, and much harder for a computer to guess.",
    "Glaciers move slowly downhill under their own weight. As they grind over rock they carve wide valleys "
    "shaped like the letter U, very different from the narrow V-shaped valleys cut by rivers.",
    "The market opens at six. By seven the fish stalls are busy, the baker has sold out of rye, and the "
    "man who sharpens knives has a queue of cooks waiting with their blades wrapped in tea towels.",
    "Compound interest means earning interest on interest. Money that grows by five percent a year roughly "
    "doubles in fourteen years, which is why starting to save early matters more than saving a lot later.",
    "Honeybees tell each other where food is by dancing. The angle of the waggle run points in the "
    "direction of the flowers relative to the sun, and its length tells how far away they are.",
    "When the power went out, the whole street came outside. Someone brought a guitar, someone else a "
    "thermos of soup, and for two hours nobody minded that the lights were off.",
    "A sorting algorithm puts items in order. Merge sort splits a list in half, sorts each half, and then "
    "merges the two sorted halves, which takes time proportional to n log n for a list of n items.",
    "Tomatoes ripen faster in a paper bag with a banana. The banana gives off ethylene, a gas that acts as "
    "a ripening signal, and the bag keeps it close to the fruit.",
    "The first maps of the coast were drawn from ships, by measuring angles to headlands and counting the "
    "hours between them. Errors piled up, and some islands appeared on charts in two places at once.",
    "Stretch gently before a long walk, drink water regularly, and wear socks that do not rub. Blisters "
    "start as small hot spots, and covering them early saves days of discomfort.",
    "Clouds form when moist air rises and cools. The water vapour condenses on tiny particles of dust or "
    "salt, and billions of these droplets together become the white shapes we see drifting overhead.",
    "The old library had a reading room with a glass ceiling. On rainy afternoons the sound of the drops "
    "mixed with the turning of pages, and the librarian would switch on the green desk lamps one by one.",
    "A unit test checks one small piece of code in isolation. Good tests are fast, independent of each "
    "other, and fail with a message that tells you exactly what went wrong.",
    "Penguins cannot fly, but they are superb swimmers. Their wings have become stiff flippers, and their "
    "dense bones help them dive deep in search of fish and krill.",
    "To make a simple vinaigrette, whisk three parts oil with one part vinegar, a pinch of salt and a "
    "spoon of mustard. The mustard helps the oil and vinegar stay mixed for longer.",
    "Volcanic soil is often very fertile. Ash weathers into minerals that plants need, which is why farms "
    "and villages cling to the slopes of mountains that might one day erupt again.",
    "The train pulled out of the station just as we reached the platform. We sat on a bench, shared an "
    "apple, and decided that the next one, an hour later, was the one we had meant to catch all along.",
    "Solar panels turn sunlight into electricity using layers of silicon. When light strikes the cells it "
    "frees electrons, and the panel's wiring collects them as a current.",
    "Learning a language is easier in small daily doses than in rare long sessions. Ten minutes of review "
    "each morning keeps new words fresh until they move into long-term memory.",
    "The chess club met on Thursdays in the back room of the café. The youngest member was nine, the "
    "oldest eighty-two, and they played each other as equals.",
    "Rust is iron oxide. It forms when iron meets water and oxygen, and unlike the thin film on aluminium "
    "it flakes away, exposing fresh metal to the air so the damage keeps spreading.",
    "A compass needle points north because it lines up with the Earth's magnetic field. The magnetic "
    "pole is not quite at the geographic pole, so navigators correct for the difference.",
    "My grandfather kept a notebook of the weather for forty years: temperature, wind, and one line "
    "about the sky. Reading it now is like hearing him describe each morning out loud.",
    "Version control records every change to a project. If a new edit breaks something, you can compare "
    "it with the last working version and see exactly which lines changed.",
    "Seeds need water, air and the right temperature to sprout. Some also need light, and a few, like "
    "those of certain pines, only open after the heat of a forest fire.",
    "The bridge was painted red so that ships could see it in fog. Painting it is never finished: by the "
    "time the crew reaches one end, the other end needs attention again.",
    "Sleep is when the brain sorts the day's memories. People who sleep well after learning something new "
    "remember it better than those who stay up late studying.",
    "In a small orchestra every player matters. If the oboe is late, everyone hears it, so the musicians "
    "watch the conductor and listen to each other at the same time.",
    "Sound travels about three hundred and forty metres per second in air. Counting the seconds between "
    "lightning and thunder and dividing by three gives the distance to the storm in kilometres.",
    "The kitten discovered the piano on its first day. It walked along the keys from the low notes to "
    "the high ones, stopped, looked back at us, and then walked along them again.",
    "Recycling aluminium saves most of the energy needed to make it from ore. A can can be melted down "
    "and back on the shelf as a new can within a couple of months.",
    "A spreadsheet formula starts with an equals sign. Typing =SUM(A1:A10) adds up the ten cells in the "
    "first column, and the total updates whenever one of them changes.",
    "The desert is cold at night because dry air and clear skies let the day's heat escape quickly. "
    "Travellers who cross it carry blankets as well as water.",
    "Our neighbour grows pumpkins so large that she needs a wheelbarrow to move them. Every October she "
    "carves one into a lantern and sets it on the wall for the children walking past.",
    "Maps use scale to shrink the world onto paper. On a map at one to fifty thousand, two centimetres "
    "stand for one kilometre on the ground.",
]

# ------------------------------------------------------------------------------------------- chat

SYSTEM = "You are a careful assistant. Think step by step before answering."


def turn(user: str, reasoning: str, answer: str, system: str | None = SYSTEM) -> dict:
    messages = [{"role": "system", "content": system}] if system else []
    messages += [{"role": "user", "content": user},
                 {"role": "assistant", "reasoning": reasoning, "content": answer}]
    return {"messages": messages}


WEATHER_TOOL = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather for a city.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
CONVERT_TOOL = {"type": "function", "function": {
    "name": "convert_currency", "description": "Convert an amount between currencies at today's rate.",
    "parameters": {"type": "object", "properties": {
        "amount": {"type": "number"}, "from": {"type": "string"}, "to": {"type": "string"}},
        "required": ["amount", "from", "to"]}}}

CHATS = [
    # Math word problems with worked reasoning.
    turn("A train travels 180 km in 2 hours and then 120 km in 1.5 hours. What is its average speed "
         "for the whole trip?",
         "Total distance is 180 + 120 = 300 km. Total time is 2 + 1.5 = 3.5 hours. "
         "Average speed is 300 / 3.5 = 85.71 km/h, about 85.7 km/h.",
         "The average speed is 300 km / 3.5 h ≈ 85.7 km/h."),
    turn("Maria buys 3 notebooks at $2.40 each and a pen for $1.15. She pays with a $10 bill. "
         "How much change does she get?",
         "Notebooks cost 3 × 2.40 = 7.20. Adding the pen: 7.20 + 1.15 = 8.35. "
         "Change is 10.00 − 8.35 = 1.65.",
         "She gets $1.65 in change."),
    turn("A rectangle has a perimeter of 36 cm and its length is twice its width. What is its area?",
         "Let the width be w, so the length is 2w. Perimeter = 2(w + 2w) = 6w = 36, so w = 6 cm and the "
         "length is 12 cm. Area = 6 × 12 = 72.",
         "The area is 72 cm²."),
    turn("If 5 workers build a wall in 12 days, how long do 8 workers take at the same rate?",
         "The job takes 5 × 12 = 60 worker-days. With 8 workers: 60 / 8 = 7.5 days.",
         "8 workers take 7.5 days."),
    turn("What is 15% of 240, and what number is 240 increased by 15%?",
         "15% of 240 is 0.15 × 240 = 36. Increasing 240 by 15% gives 240 + 36 = 276.",
         "15% of 240 is 36; 240 increased by 15% is 276."),
    # General reasoning.
    turn("Is 221 a prime number?",
         "Check small primes up to √221 ≈ 14.9: 2, 3, 5, 7, 11, 13. 221 / 13 = 17 exactly, since "
         "13 × 17 = 221. So it has divisors other than 1 and itself.",
         "No. 221 = 13 × 17, so it is not prime."),
    turn("Which is heavier, a kilogram of feathers or a kilogram of steel?",
         "Both are stated as one kilogram, so their masses are equal. The steel is denser and takes up "
         "less space, but that does not change the mass.",
         "Neither: both weigh one kilogram. The feathers just take up far more space."),
    turn("Put these in order from smallest to largest: 0.5, 3/8, 0.45, 2/5.",
         "Convert to decimals: 3/8 = 0.375, 2/5 = 0.4, and 0.45 and 0.5 as given. Ordering: "
         "0.375 < 0.4 < 0.45 < 0.5.",
         "3/8, 2/5, 0.45, 0.5."),
    turn("Write a Python function that returns the sum of the even numbers in a list.",
         "Iterate over the list, keep numbers where n % 2 == 0, and add them. A generator expression "
         "inside sum() does this in one line and handles an empty list (sum is 0).",
         "def sum_even(numbers):\n    return sum(n for n in numbers if n % 2 == 0)"),
    turn("Translate 'Where is the train station?' into French and Spanish.",
         "French: 'Où est la gare ?' (French puts a space before the question mark). "
         "Spanish: '¿Dónde está la estación de tren?' with the opening question mark.",
         "French: Où est la gare ?\nSpanish: ¿Dónde está la estación de tren?"),
    turn("Summarise why the sky looks blue in one sentence.",
         "Sunlight contains all colours; air molecules scatter short wavelengths (blue) much more "
         "strongly than long ones (red), so scattered blue light reaches our eyes from all directions.",
         "Air molecules scatter blue sunlight much more than red, so blue light comes at us from every "
         "part of the sky.", system=None),
    turn("A clock shows 3:00. What is the angle between the hour and minute hands?",
         "Each hour mark is 360 / 12 = 30 degrees apart. At 3:00 the minute hand is on 12 and the hour "
         "hand exactly on 3, three marks away: 3 × 30 = 90 degrees.",
         "90 degrees."),
    turn("I have two coins that add up to 30 cents, and one of them is not a nickel. What are they?",
         "A quarter and a nickel make 30 cents. The riddle says one of them is not a nickel, which is "
         "true of the quarter; the other one can still be a nickel.",
         "A quarter and a nickel: the quarter is the one that is not a nickel."),
    turn("Give me three tips for a first-time camper.",
         "Useful, concrete advice: practise pitching the tent at home, pack layers because nights are "
         "colder than expected, and plan water since streams may need treating.",
         "1. Pitch your tent once at home before the trip.\n2. Pack warm layers; nights get cold.\n"
         "3. Bring enough water or a way to treat it."),
    {"messages": [
        {"role": "system", "content": SYSTEM},
        {"role": "user", "content": "How many minutes are there in a week?"},
        {"role": "assistant", "reasoning": "60 minutes × 24 hours = 1440 per day; × 7 = 10080.",
         "content": "There are 10,080 minutes in a week."},
        {"role": "user", "content": "And seconds?"},
        {"role": "assistant", "reasoning": "10080 minutes × 60 = 604800 seconds.",
         "content": "604,800 seconds."},
    ]},
    {"messages": [
        {"role": "user", "content": "Can you suggest a name for a grey cat?"},
        {"role": "assistant", "reasoning": "Grey suggests names like Smoke, Ash, Pebble or Misty.",
         "content": "How about Pebble? Smoke and Misty also suit a grey cat."},
        {"role": "user", "content": "Something longer, please."},
        {"role": "assistant", "reasoning": "Longer, grey-themed names: Sir Cumulus (a cloud), Earl Grey.",
         "content": "Try Earl Grey or Sir Cumulus, after the grey clouds."},
    ]},
    # Tool calls: the assistant calls a tool, reads its result, then answers.
    {"tools": [WEATHER_TOOL], "messages": [
        {"role": "user", "content": "Do I need an umbrella in Lisbon today?"},
        {"role": "assistant", "reasoning": "I need the current weather in Lisbon; call get_weather.",
         "content": "", "tool_calls": [{"name": "get_weather", "arguments": {"city": "Lisbon"}}]},
        {"role": "tool", "content": '{"city": "Lisbon", "condition": "light rain", "temp_c": 17}'},
        {"role": "assistant", "reasoning": "The tool reports light rain, so an umbrella is sensible.",
         "content": "Yes: it is raining lightly in Lisbon (17 °C), so take an umbrella."},
    ]},
    {"tools": [CONVERT_TOOL, WEATHER_TOOL], "messages": [
        {"role": "system", "content": SYSTEM},
        {"role": "user", "content": "How much is 250 euros in US dollars?"},
        {"role": "assistant", "reasoning": "Use convert_currency with amount 250, from EUR, to USD.",
         "content": "", "tool_calls": [{"name": "convert_currency",
                                        "arguments": {"amount": 250, "from": "EUR", "to": "USD"}}]},
        {"role": "tool", "content": '{"amount": 270.5, "currency": "USD", "rate": 1.082}'},
        {"role": "assistant", "reasoning": "250 × 1.082 = 270.5, matching the tool's result.",
         "content": "250 euros is about 270.50 US dollars at today's rate of 1.082."},
    ]},
    turn("Explain what a hash table is to a beginner.",
         "Start from the everyday idea: a function turns a key into a slot number, so lookup jumps "
         "straight to the slot instead of searching. Mention collisions briefly.",
         "A hash table stores items in numbered slots. A hash function turns each key, like a name, into "
         "a slot number, so finding it later is one jump instead of a search. When two keys land in the "
         "same slot, the table keeps both there and checks which is which."),
    turn("Convert 72 degrees Fahrenheit to Celsius.",
         "C = (F − 32) × 5/9 = (72 − 32) × 5/9 = 40 × 5/9 = 22.2.",
         "72 °F is about 22.2 °C."),
]

# ------------------------------------------------------------------------------------------ images
# Each entry: file name, size (W, H), drawing function, caption. Captions describe the drawing exactly.


def draw_red_circle(d: ImageDraw.ImageDraw, w: int, h: int) -> None:
    d.ellipse((w // 2 - 40, h // 2 - 40, w // 2 + 40, h // 2 + 40), fill=(220, 30, 30))


def draw_three_blue_squares(d, w, h):
    for i in range(3):
        x = 20 + i * 70
        d.rectangle((x, h // 2 - 25, x + 50, h // 2 + 25), fill=(30, 60, 200))


def draw_triangle_over_rectangle(d, w, h):
    d.polygon([(w // 2, 20), (w // 2 - 50, 90), (w // 2 + 50, 90)], fill=(40, 170, 60))
    d.rectangle((w // 2 - 60, 110, w // 2 + 60, 150), fill=(240, 210, 40))


def draw_gradient(d, w, h):
    for x in range(w):
        v = round(255 * x / (w - 1))
        d.line((x, 0, x, h), fill=(v, v, v))


def draw_checkerboard(d, w, h):
    cell = w // 4
    for r in range(4):
        for c in range(4):
            if (r + c) % 2 == 0:
                d.rectangle((c * cell, r * cell, (c + 1) * cell - 1, (r + 1) * cell - 1), fill=(0, 0, 0))


def draw_house(d, w, h):
    d.rectangle((0, 0, w, h), fill=(150, 200, 255))  # sky
    d.rectangle((0, h - 40, w, h), fill=(60, 160, 60))  # grass
    d.rectangle((90, 110, 230, h - 40), fill=(150, 90, 40))  # walls
    d.polygon([(80, 110), (160, 50), (240, 110)], fill=(200, 30, 30))  # roof
    d.rectangle((145, 150, 175, h - 40), fill=(90, 50, 20))  # door


def draw_sun_over_hill(d, w, h):
    d.rectangle((0, 0, w, h), fill=(170, 215, 255))
    d.ellipse((-60, h - 90, w + 60, h + 120), fill=(70, 150, 60))
    d.ellipse((w - 90, 20, w - 30, 80), fill=(255, 215, 0))


def draw_overlapping_circles(d, w, h):
    d.ellipse((40, 40, 160, 160), outline=(220, 30, 30), width=6)
    d.ellipse((110, 40, 230, 160), outline=(30, 60, 200), width=6)


def draw_bar_chart(d, w, h):
    d.line((20, h - 20, w - 10, h - 20), fill=(0, 0, 0), width=2)
    d.line((20, 10, 20, h - 20), fill=(0, 0, 0), width=2)
    for i, height in enumerate((40, 80, 120, 60)):
        x = 40 + i * 55
        d.rectangle((x, h - 20 - height, x + 35, h - 21), fill=(255, 140, 0))


def draw_stripes(d, w, h):
    colours = [(220, 30, 30), (255, 255, 255)]
    for i in range(6):
        d.rectangle((0, i * h // 6, w, (i + 1) * h // 6 - 1), fill=colours[i % 2])


def draw_traffic_light(d, w, h):
    d.rectangle((w // 2 - 30, 10, w // 2 + 30, h - 10), fill=(40, 40, 40))
    for i, colour in enumerate(((230, 30, 30), (240, 190, 20), (40, 200, 60))):
        cy = 45 + i * 65
        d.ellipse((w // 2 - 22, cy - 22, w // 2 + 22, cy + 22), fill=colour)


def draw_big_scene(d, w, h):
    # Larger than the others on purpose: at longest_edge 1024 it needs 40x30 = 1200 patches, more than
    # a small row's patch budget, so the demo exercises the downscale-to-fit path.
    d.rectangle((0, 0, w, h // 2), fill=(20, 30, 90))  # night sky
    d.rectangle((0, h // 2, w, h), fill=(30, 80, 140))  # sea
    d.ellipse((470, 60, 550, 140), fill=(245, 245, 220))  # moon
    d.polygon([(200, 300), (360, 300), (330, 340), (230, 340)], fill=(120, 70, 30))  # boat hull
    d.line((280, 300, 280, 200), fill=(230, 230, 230), width=4)  # mast
    d.polygon([(284, 205), (284, 295), (350, 295)], fill=(245, 245, 245))  # sail


IMAGES = [
    ("red_circle.png", (160, 120), draw_red_circle,
     "A single solid red circle in the centre of a plain white background."),
    ("blue_squares.png", (240, 100), draw_three_blue_squares,
     "Three identical blue squares in a horizontal row, evenly spaced on a white background."),
    ("triangle_rectangle.png", (200, 170), draw_triangle_over_rectangle,
     "A green triangle pointing upward, above a wide yellow rectangle, both centred on a white background."),
    ("gradient.png", (256, 64), draw_gradient,
     "A horizontal greyscale gradient that goes smoothly from black on the left to white on the right."),
    ("checkerboard.png", (128, 128), draw_checkerboard,
     "A four by four black and white checkerboard with a black square in the top-left corner."),
    ("house.png", (320, 240), draw_house,
     "A simple drawing of a brown house with a red triangular roof and a dark brown door, standing on "
     "green grass under a light blue sky."),
    ("sun_hill.png", (300, 200), draw_sun_over_hill,
     "A yellow sun in the upper right of a light blue sky above a rounded green hill."),
    ("circles.png", (270, 200), draw_overlapping_circles,
     "Two overlapping circle outlines on white: a red one on the left and a blue one on the right."),
    ("bar_chart.png", (280, 180), draw_bar_chart,
     "A bar chart with black axes and four orange bars; the third bar is the tallest and the first is "
     "the shortest."),
    ("stripes.png", (180, 120), draw_stripes,
     "Six horizontal stripes alternating red and white, with red at the top."),
    ("traffic_light.png", (120, 220), draw_traffic_light,
     "A dark grey traffic light with three round lamps: red at the top, yellow in the middle and green "
     "at the bottom."),
    ("night_boat.png", (640, 480), draw_big_scene,
     "A sailing boat with a brown hull and a white sail on a blue sea at night, with a pale full moon in "
     "the dark blue sky at the upper right."),
]

PROMPTS = ["Describe the image.", "What do you see in this picture?", "Describe the image in one sentence."]


def multimodal_records() -> list[dict]:
    records = []
    for i, (name, _, _, caption) in enumerate(IMAGES):
        user = [{"type": "image", "path": f"images/{name}"}, {"type": "text", "text": PROMPTS[i % len(PROMPTS)]}]
        records.append({"messages": [{"role": "user", "content": user},
                                     {"role": "assistant", "content": caption}]})
    return records


def write_images(folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for name, (w, h), draw, _ in IMAGES:
        img = Image.new("RGB", (w, h), (255, 255, 255))
        draw(ImageDraw.Draw(img), w, h)
        img.save(folder / name, optimize=True)


def write_jsonl(path: Path, records: list[dict]) -> None:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")


def tokenizer_corpus() -> list[str]:
    """What the demo tokenizer is trained on: the shipped texts, generated text and chats, the synthetic
    visual tasks' questions and answers, and the chat format's markers."""
    from apriel_jax.data.synthetic import TaskMixture
    from apriel_jax.data.synthetic.text import SyntheticReasoningChats, SyntheticText

    texts = list(PARAGRAPHS)
    for chat in CHATS + multimodal_records():
        for m in chat["messages"]:
            content = m.get("content")
            texts += [content] if isinstance(content, str) else [c["text"] for c in content or [] if "text" in c]
            texts += [m["reasoning"]] if m.get("reasoning") else []
    texts += [SyntheticText(seed=99)[i]["text"] for i in range(3000)]
    for i in range(1000):
        for m in SyntheticReasoningChats(seed=99)[i]["messages"]:
            texts += [m["content"]] + ([m["reasoning"]] if m.get("reasoning") else [])
    tasks = TaskMixture(seed=99, size=(64, 64))
    for i in range(400):
        for m in tasks[i]["messages"]:
            content = m["content"]
            texts += [content] if isinstance(content, str) else [c["text"] for c in content if "text" in c]
    markers = ("<|system|>", "<|user|>", "<|assistant|>", "<|end|>", "Here are my reasoning steps:",
               "[BEGIN FINAL RESPONSE]", "[END FINAL RESPONSE]", "<think>", "</think>", "<nothink>")
    return texts + [" ".join(markers)] * 50


def write_tokenizer(out: Path, vocab_size: int = 1024) -> None:
    """A byte-level BPE sized for the tiny model's 1024-row vocabulary (the real Tekken tokenizer has
    131072 ids; its LM head alone would dominate a CPU demo)."""
    from apriel_jax.data.tokenizer import train_tiny_tokenizer

    train_tiny_tokenizer(tokenizer_corpus(), vocab_size, out / "tokenizer.json")


def main(out: Path = HERE) -> None:
    write_jsonl(out / "text.jsonl", [{"text": p} for p in PARAGRAPHS])
    write_jsonl(out / "chat_sft.jsonl", CHATS)
    write_images(out / "images")
    write_jsonl(out / "multimodal.jsonl", multimodal_records())
    write_tokenizer(out)


if __name__ == "__main__":
    main()
