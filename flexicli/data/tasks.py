"""A small built-in task suite in FlexiDepth's categories, used by `flexi eval` (scores, retention) and
`flexi patterns` (which tokens need depth). Deterministic: the same items every run, no network.

    load_tasks() -> list[Task]; Task.score(output_text) -> float in [0, 1]
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass

CATEGORIES = ("copy", "repetition", "summarisation", "continuation", "addition", "multiplication", "factual_qa")

_SENTENCES = [
    "The quick brown fox jumps over the lazy dog.",
    "Rain is expected in the northern valleys tomorrow morning.",
    "She packed two books, a lamp and a small green notebook.",
    "Every student must hand in the report before Friday.",
    "The museum opens at nine and closes at five.",
    "Our train left the station twenty minutes late.",
    "My brother planted six apple trees behind the old barn.",
    "The library will be closed on Sunday for repairs.",
    "A cold wind blew across the frozen lake all night.",
    "Please bring a pencil, an eraser and a ruler to class.",
    "The baker sold forty loaves of bread before noon.",
    "We watched the boats return to the harbour at sunset.",
]
_PASSAGES = [
    ("The city council met on Monday to discuss the new park. After a long debate, members voted to build it "
     "next to the river, with a playground, a small lake and walking paths. Work will start in spring.",
     "The council voted to build a new park by the river, starting in spring."),
    ("Maria trained for months to run her first marathon. On race day it was hot, but she kept a steady pace, "
     "drank water at every station and finished in just under four hours.",
     "Maria ran her first marathon in under four hours despite the heat."),
    ("The company released a phone with a larger battery and a better camera. Early reviews praise the battery "
     "life but say the price is too high for most buyers.",
     "A new phone has a better battery and camera, but reviewers find it expensive."),
    ("A storm hit the coast on Tuesday night. Strong winds knocked down trees and power lines, and thousands of "
     "homes were without electricity until Thursday, when repair crews finished their work.",
     "A storm cut power to thousands of coastal homes for two days."),
    ("The school library bought three hundred new books this year. Most of them are novels and science books "
     "chosen by the students, and the library now stays open until six in the evening.",
     "The school library added many new books chosen by students and opens longer."),
    ("Tom forgot his umbrella on the way to work. It started to rain heavily, so he ran into a cafe, ordered a "
     "coffee and waited there for an hour until the rain stopped.",
     "Tom waited out heavy rain in a cafe because he had no umbrella."),
    ("Scientists found a new species of frog in the mountains of Peru. The frog is smaller than a coin, lives "
     "under wet leaves and has bright orange spots on its back.",
     "Scientists found a tiny new frog species with orange spots in Peru."),
    ("The town's only bakery closed after fifty years. The owners said they were too old to keep working, and "
     "no one in the family wanted to take over the business.",
     "The town's old bakery closed because the owners retired and no one took over."),
    ("A local team won the regional football cup on Saturday. They were losing at half time, but scored two "
     "goals in the last ten minutes and celebrated with their fans in the town square.",
     "A local team came from behind to win the regional football cup."),
    ("The new bus line connects the airport with the city centre. Buses run every fifteen minutes from five in "
     "the morning until midnight, and a ticket costs the same as a normal city fare.",
     "A new bus line links the airport and city centre often and cheaply."),
    ("Anna wanted to learn to cook, so she took a class every Wednesday evening. After three months she could "
     "make bread, soup and pasta, and she invited her friends to a dinner.",
     "Anna learned to cook in a weekly class and made dinner for her friends."),
    ("Heavy snow closed the mountain road for three days. Villagers ran out of fresh food, so a helicopter "
     "brought supplies until workers cleared the road on Friday.",
     "Snow closed a mountain road, and a helicopter supplied villagers until it reopened."),
]
# Openings with one natural next word: scored by whether the model's continuation contains it ("|": alternatives).
_CONTINUATIONS = [
    ("The three primary colours are red, yellow and", "blue"),
    ("To make a cup of tea, first boil the", "water"),
    ("The days of the week are Monday, Tuesday, Wednesday,", "Thursday"),
    ("The months of the year begin with January, February, March,", "April"),
    ("The sun rises in the east and sets in the", "west"),
    ("Roses are red, violets are", "blue"),
    ("One, two, three, four,", "five|5"),
    ("Twinkle, twinkle, little star, how I wonder what you", "are"),
    ("Water freezes at zero degrees and boils at one hundred degrees", "Celsius|centigrade"),
    ("The opposite of hot is", "cold"),
    ("Cats say meow and dogs say", "woof|bark"),
    ("Spring, summer, autumn and", "winter"),
]
_FACTS = [
    ("What is the capital of France?", "Paris"), ("What is the capital of Japan?", "Tokyo"),
    ("How many days are in a week?", "7|seven"), ("What planet do we live on?", "Earth"),
    ("What is the largest ocean on Earth?", "Pacific"), ("What colour is the sky on a clear day?", "blue"),
    ("What is frozen water called?", "ice"), ("How many legs does a spider have?", "8|eight"),
    ("What is the capital of Italy?", "Rome"), ("How many months are in a year?", "12|twelve"),
    ("Which animal is known as the king of the jungle?", "lion"), ("What do bees make?", "honey"),
]
_WORDS = ["apple", "river", "stone", "cloud", "lamp", "tiger", "house", "green", "music", "paper", "chair", "light"]
# Items 13-48 of each category, added when the suite grew from 84 items to 336; the first 12 stay first.
_SENTENCES += [
    "The old dog slept by the fire all evening.",
    "Please close the window before you leave the room.",
    "My sister baked a chocolate cake for the party.",
    "The children played in the garden until it got dark.",
    "A small boat drifted slowly down the quiet river.",
    "He always drinks a glass of milk before bed.",
    "The shop on the corner sells fresh fruit and vegetables.",
    "We walked along the beach and collected shiny shells.",
    "The teacher wrote three new words on the board.",
    "Leaves turn red and gold in the autumn.",
    "Our neighbours painted their front door bright yellow.",
    "The farmer fed the chickens early in the morning.",
    "I left my keys on the kitchen table again.",
    "The bus stops outside the school every morning.",
    "She wore a warm coat and a woollen hat.",
    "The kettle whistled loudly while we set the table.",
    "Two birds built a nest in the tall oak tree.",
    "The road to the village is narrow and steep.",
    "He fixed the broken chair with glue and a hammer.",
    "The cinema was full on Saturday evening.",
    "Fresh snow covered the hills when we woke up.",
    "My grandmother keeps her letters in a wooden box.",
    "The waiter brought us soup, bread and a jug of water.",
    "Our cat likes to sleep in a sunny spot by the window.",
    "The hospital is at the end of this long street.",
    "They painted the fence white during the summer holidays.",
    "A gentle breeze moved the curtains in the bedroom.",
    "The lights went out during the storm last night.",
    "We bought a map before we started the long walk.",
    "The puppy chased a red ball across the grass.",
    "Most shops in town close early on Sunday.",
    "She sang a quiet song to the sleeping baby.",
    "The bridge over the river was built of stone.",
    "He poured hot coffee into a big blue mug.",
    "The clock in the hall stopped at midnight.",
    "Tall grass grew along both sides of the path.",
]
_PASSAGES += [
    ("A small fire started in the kitchen of a restaurant on Friday evening. The staff quickly led all the guests "
     "outside, and firefighters put out the flames in a few minutes. No one was hurt.",
     "A restaurant kitchen fire was put out quickly and no one was hurt."),
    ("Lucy lost her cat during a thunderstorm. She put posters on every street in her town and asked her "
     "neighbours for help. Three days later, a farmer found the cat sleeping in his barn and brought it home.",
     "Lucy's lost cat was found sleeping in a farmer's barn three days later."),
    ("The village held its first summer fair in the main square. There were food stalls, music and games for "
     "children, and more than a thousand people came. The organisers plan to make it a yearly event.",
     "The village's first summer fair drew over a thousand people and will become yearly."),
    ("A new swimming pool opened in the town centre on Saturday. It has a large pool for adults, a shallow pool "
     "for children and a cafe. Entry is free for everyone during the first week.",
     "A new town swimming pool opened, with free entry during its first week."),
    ("Sam found an old wallet on the train. Inside there was money, a bank card and a photo, but no phone number. "
     "He took it to the station office, and the owner collected it the same afternoon.",
     "Sam handed in a wallet he found on the train, and the owner collected it."),
    ("Farmers in the valley had a very dry summer. With little rain, many crops grew poorly, and vegetable prices "
     "at the local market went up. The farmers are hoping for a wetter autumn.",
     "A dry summer hurt the valley's crops and raised vegetable prices at the market."),
    ("A baby elephant was born at the city zoo last week. Mother and baby are both healthy, and visitors can see "
     "them from Monday. The zoo has asked the public to suggest a name.",
     "A baby elephant was born at the zoo, and visitors can suggest a name."),
    ("Ben wanted to buy a bicycle, so he saved his pocket money for a year. He also washed cars for his "
     "neighbours at weekends. In June he finally had enough and bought a red bike.",
     "Ben saved money and washed cars until he could buy a red bicycle."),
    ("Heavy rain flooded several streets near the river on Sunday. Water entered the ground floor of some houses, "
     "and families moved to a school hall for the night. The water went down by Monday afternoon.",
     "Heavy rain flooded streets near the river, and families spent the night in a school."),
    ("A local bookshop started a reading club for children. Every Saturday morning, a volunteer reads stories "
     "aloud, and the children draw pictures of their favourite parts. A second group will start soon.",
     "A bookshop's popular Saturday reading club for children will soon add a second group."),
    ("Emma planted tomatoes, beans and carrots in her back garden. She watered them every evening and kept the "
     "birds away with a net. By late summer she had more vegetables than her family could eat.",
     "Emma grew so many vegetables in her garden that her family could not eat them all."),
    ("The old cinema in the town reopened after two years of repairs. It now has new seats, a bigger screen and "
     "better sound. The first film sold out within an hour.",
     "The town's old cinema reopened with new seats and a bigger screen, and sold out."),
    ("A hiker got lost in the forest after dark. He called for help using his phone, and a rescue team found him "
     "near a stream two hours later. He was cold and tired but not injured.",
     "A rescue team found a lost hiker in the forest, cold but not injured."),
    ("The town's main bridge will close for repairs next month. Cars will have to use a longer road around the "
     "lake, and extra buses will run for people going to work. The work should take six weeks.",
     "The main bridge will close for six weeks of repairs, and extra buses will run."),
    ("A school held a bake sale to raise money for new sports equipment. Parents and pupils made cakes, biscuits "
     "and bread. By the afternoon every table was empty, and the school had enough money.",
     "A school bake sale sold out and raised enough money for new sports equipment."),
    ("A fisherman caught a very large fish in the lake on Thursday morning. It was almost as long as his boat, "
     "and he needed help to pull it in. He took a photo and then let it go.",
     "A fisherman caught a huge fish in the lake, took a photo and released it."),
    ("The power went out across the town on Wednesday evening. Shops closed early, and people used candles and "
     "torches at home. Workers fixed a broken cable, and power returned just before midnight.",
     "A broken cable cut the town's power on Wednesday evening until just before midnight."),
    ("Jack started a new job at a hotel by the sea. On his first day he carried bags, answered the phone and "
     "helped guests find their rooms. He was tired in the evening but happy.",
     "Jack had a busy but happy first day at his new hotel job."),
    ("A new playground opened next to the primary school. It has swings, a slide and a climbing frame, and the "
     "ground is covered with soft rubber. Children can use it after school and at weekends.",
     "A new playground with swings and a slide opened next to the primary school."),
    ("A farmer's cows escaped from their field early on Tuesday and walked onto the main road. Traffic stopped "
     "for almost an hour while the farmer led the animals back through the gate.",
     "Escaped cows blocked the main road for an hour until they were led back."),
    ("The local library started lending tools as well as books. People can borrow a drill, a ladder or a garden "
     "saw for a week at no cost. The idea has been popular with new home owners.",
     "The library now lends tools like drills and ladders for free for a week."),
    ("Lily entered a painting competition at her school. She painted the harbour at sunset with small boats and "
     "orange clouds. The judges gave her first prize, and her picture now hangs in the main hall.",
     "Lily won first prize in a school painting competition with her harbour picture."),
    ("A strong wind blew the roof off a barn on a farm near the village. Nobody was hurt, but several sheep ran "
     "away. Neighbours helped the farmer find the animals and cover the barn.",
     "Strong wind blew the roof off a farm barn, and neighbours helped find the sheep."),
    ("The city opened a new bicycle lane along the river. It is separated from the road by a low wall, so "
     "cyclists feel safer. Many people now ride to work instead of driving.",
     "A new, safer bicycle lane along the river has led many people to cycle to work."),
    ("A family found a small bird with a hurt wing in their garden. They kept it warm in a box and took it to an "
     "animal doctor. After two weeks, the bird was well enough to fly away.",
     "A family cared for a bird with a hurt wing until it could fly away."),
    ("The school choir travelled to the capital to sing in a national competition. They did not win, but the "
     "judges praised their voices and invited them to come back next year.",
     "The school choir did not win the national competition but was praised by the judges."),
    ("A new bakery opened on the high street last week. It sells fresh bread, cakes and coffee, and it opens at "
     "six every morning. On the first day, a long queue formed outside before the doors opened.",
     "A new bakery on the high street drew a long queue on its first day."),
    ("Tim missed the last bus home after a concert. His phone battery was dead, so he walked for an hour through "
     "the rain. He arrived home wet and tired but safe.",
     "Tim missed the last bus and walked home in the rain for an hour."),
    ("A water pipe burst under the main street on Monday morning. The road was closed for the whole day, and "
     "some homes had no running water. Workers replaced the pipe by evening.",
     "A burst water pipe closed the main street and cut water to homes for a day."),
    ("A museum in the city opened a new room about dinosaurs. It shows large bones, eggs and a full skeleton as "
     "tall as a house. Children can also dig for fake fossils in a sand pit.",
     "A city museum opened a new dinosaur room with bones, eggs and a skeleton."),
    ("Grace wanted to learn the piano, so she practised for half an hour every evening. After a year she played "
     "her first concert for her family, and everyone clapped loudly at the end.",
     "Grace practised the piano every evening and played her first concert for her family."),
    ("A small plane landed safely in a field after its engine failed. The pilot and his two passengers walked "
     "away without injuries. A farmer gave them tea while they waited for help.",
     "A small plane landed safely in a field after engine failure, and no one was hurt."),
    ("Ice on the roads caused many small accidents on Thursday morning. Schools opened late, and buses ran "
     "slowly. The police asked drivers to stay at home unless their journey was really needed.",
     "Icy roads caused many accidents, and police asked drivers to stay at home."),
    ("A volunteer group cleaned the beach on Sunday. They collected more than a hundred bags of plastic, bottles "
     "and old fishing nets. The group plans to meet on the first Sunday of every month.",
     "Volunteers collected over a hundred bags of rubbish while cleaning the beach on Sunday."),
    ("Oliver and his father built a small wooden boat in their garage over the winter. In spring they took it to "
     "the lake, and it floated perfectly on its first trip.",
     "Oliver and his father built a wooden boat that floated perfectly on the lake."),
    ("The town's football stadium got new lights this summer. Now the team can play matches in the evening, and "
     "more fans can come after work. The first evening match drew a large crowd.",
     "New lights let the town's team play evening matches, which drew a large crowd."),
]
_CONTINUATIONS += [
    ("Jack and Jill went up the", "hill"),
    ("Humpty Dumpty sat on a", "wall"),
    ("Mary had a little", "lamb"),
    ("Hickory, dickory, dock, the mouse ran up the", "clock"),
    ("Baa, baa, black sheep, have you any", "wool"),
    ("Knock, knock. Who's", "there"),
    ("The opposite of up is", "down"),
    ("The opposite of black is", "white"),
    ("Please pass the salt and", "pepper"),
    ("Good evening, ladies and", "gentlemen"),
    ("Once upon a", "time"),
    ("An apple a day keeps the doctor", "away"),
    ("First, second, third,", "fourth|4th"),
    ("Five, six, seven,", "eight|8"),
    ("The early bird catches the", "worm"),
    ("Actions speak louder than", "words"),
    ("Better late than", "never"),
    ("Rock, paper,", "scissors"),
    ("On the table there was a knife, a fork and a", "spoon"),
    ("Hey diddle diddle, the cat and the fiddle, the cow jumped over the", "moon"),
    ("Row, row, row your boat, gently down the", "stream"),
    ("Three blind", "mice"),
    ("Head, shoulders, knees and", "toes"),
    ("The itsy bitsy spider climbed up the water", "spout"),
    ("Old MacDonald had a", "farm"),
    ("Practice makes", "perfect"),
    ("The opposite of day is", "night"),
    ("North, south, east and", "west"),
    ("Where there is a will, there is a", "way"),
    ("Don't judge a book by its", "cover"),
    ("Every cloud has a silver", "lining"),
    ("Look before you", "leap"),
    ("The three meals of the day are breakfast, lunch and", "dinner|supper"),
    ("The grass is always greener on the other", "side"),
    ("Curiosity killed the", "cat"),
    ("The opposite of open is", "closed|shut"),
]
_FACTS += [
    ("What is the capital of Germany?", "Berlin"), ("What is the capital of Spain?", "Madrid"),
    ("What is the capital of England?", "London"), ("What is the capital of Russia?", "Moscow"),
    ("What is the capital of China?", "Beijing|Peking"), ("What is the capital of Egypt?", "Cairo"),
    ("What is the capital of Canada?", "Ottawa"), ("What is the capital of Greece?", "Athens"),
    ("How many legs does a dog have?", "4|four"), ("How many wheels does a bicycle have?", "2|two"),
    ("How many legs does an insect have?", "6|six"), ("What colour is grass?", "green"),
    ("What colour is a ripe banana?", "yellow"), ("What is the closest star to Earth?", "Sun"),
    ("Which animal gives us milk?", "cow|cows"), ("What is the largest planet in our solar system?", "Jupiter"),
    ("What gas do humans need to breathe?", "oxygen"), ("How many eyes does a person have?", "2|two"),
    ("Which organ pumps blood around the body?", "heart"), ("What is a baby cat called?", "kitten"),
    ("What is a baby dog called?", "puppy|pup"), ("What colour is snow?", "white"),
    ("How many sides does a triangle have?", "3|three"), ("How many sides does a square have?", "4|four"),
    ("What is the largest animal on Earth?", "whale"), ("What do fish use to breathe?", "gills"),
    ("Which planet is known as the Red Planet?", "Mars"),
    ("At what temperature in Celsius does water boil?", "100|one hundred"),
    ("What is the largest continent?", "Asia"), ("What is the tallest animal?", "giraffe"),
    ("What is a baby cow called?", "calf"), ("What language is spoken in Spain?", "Spanish"),
    ("How many continents are there?", "7|seven"), ("What is the opposite of north?", "south"),
    ("In which direction does the sun rise?", "east"), ("How many fingers are on one hand?", "5|five"),
]
_WORDS += [
    "table", "bread", "water", "garden", "window", "horse", "flower", "yellow", "happy", "orange",
    "basket", "candle", "forest", "island", "jacket", "lemon", "ocean", "pencil", "pillow", "rabbit",
    "silver", "summer", "train", "winter", "bottle", "butter", "carpet", "doctor", "finger", "guitar",
    "hammer", "ladder", "market", "mirror", "monkey", "planet"]
# Tokens to generate per category: room for a good answer, no more (generation is the slow part of eval). A small
# model often works sums out before it gives the number ("To solve this, we need to add 46 and 27: ..."), so the
# arithmetic answers get room for that (measured on SmolLM2-135M: at 8 tokens no answer was complete).
NEW_TOKENS = {"copy": 32, "repetition": 24, "summarisation": 40, "continuation": 12, "addition": 32,
              "multiplication": 32, "factual_qa": 16}
# Items per category (load_tasks builds this many; flexi eval takes --tasks-per-category of them). 48 since the suite
# grew from 12 (84 items): retention is a ratio over the items the original gets right (~44 of 84), and copies of
# SmolLM2 that only round its weights kept 0.86-0.975 of its score on 84 items, so one run measured retention to
# about +-0.1 (docs/results.md, Task retention). The first CORE of each category are the 84-item suite.
PER_CATEGORY = 48
CORE = 12


@dataclass(frozen=True)
class Task:
    category: str
    prompt: str  # the user's message (goes through the chat template)
    answer: str  # reference; for "contains" scoring, alternatives separated by "|"
    scoring: str  # "contains" | "exact_start" | "f1"

    @property
    def max_new_tokens(self) -> int:
        return NEW_TOKENS[self.category]

    def score(self, output: str) -> float:
        out = output.strip()
        if self.scoring == "contains":
            return float(any(re.search(rf"\b{re.escape(a)}\b", out, re.IGNORECASE) for a in self.answer.split("|")))
        if self.scoring == "exact_start":
            return float(_norm(out).startswith(_norm(self.answer)))
        return unigram_f1(out, self.answer)


def _norm(s: str) -> str:
    return " ".join(re.findall(r"\w+", s.lower()))


def unigram_f1(prediction: str, reference: str) -> float:
    p, r = _norm(prediction).split(), _norm(reference).split()
    if not p or not r:
        return float(p == r)
    common = sum(min(p.count(w), r.count(w)) for w in set(r))
    if common == 0:
        return 0.0
    precision, recall = common / len(p), common / len(r)
    return 2 * precision * recall / (precision + recall)


def load_tasks(categories=None, per_category: int | None = None, seed: int = 0) -> list[Task]:
    rng = random.Random(seed)
    reps = [(w, rng.randint(3, 5)) for w in _WORDS[:CORE]]
    sums = [(rng.randint(2, 9), rng.randint(2, 9)) for _ in range(CORE)]
    products = [(rng.randint(2, 12), rng.randint(2, 12)) for _ in range(CORE)]
    # The items past the first CORE of each category draw from a generator of their own, so the first CORE stay the
    # 84-item suite that the figures before the suite grew were measured on (`--tasks-per-category 12` gives it)
    more = random.Random(seed + 1)
    reps += [(w, more.randint(3, 5)) for w in _WORDS[CORE:]]
    sums += _new_pairs(more, 2, 9, PER_CATEGORY - CORE, sums)
    products += _new_pairs(more, 2, 12, PER_CATEGORY - CORE, products)
    items: list[Task] = []
    items += [Task("copy", f"Repeat this sentence exactly, and nothing else: {s}", s, "exact_start")
              for s in _SENTENCES]
    items += [Task("repetition", f"Write the word '{w}' {n} times, separated by spaces, and nothing else.",
                   " ".join([w] * n), "exact_start") for w, n in reps]
    items += [Task("summarisation", f"Summarise in one sentence: {p}", ref, "f1") for p, ref in _PASSAGES]
    items += [Task("continuation", f"Continue this text: {p}", ref, "contains") for p, ref in _CONTINUATIONS]
    items += [Task("addition", f"What is {a} + {b}? Answer with the number only.", str(a + b), "contains")
              for a, b in sums]
    items += [Task("multiplication", f"What is {a} * {b}? Answer with the number only.", str(a * b), "contains")
              for a, b in products]
    items += [Task("factual_qa", q + " Answer in a few words.", a, "contains") for q, a in _FACTS]
    if categories:
        unknown = set(categories) - set(CATEGORIES)
        if unknown:
            raise ValueError(f"unknown task categories {sorted(unknown)}; known: {', '.join(CATEGORIES)}")
        items = [t for t in items if t.category in categories]
    if per_category:
        seen: dict[str, int] = {}
        items = [t for t in items if seen.setdefault(t.category, 0) < per_category and not seen.update(
            {t.category: seen[t.category] + 1})]
    return items


def _new_pairs(rng: random.Random, low: int, high: int, n: int, taken: list) -> list[tuple[int, int]]:
    """n number pairs in [low, high] that are not yet in `taken` (the suite's earlier items), none twice."""
    out: list[tuple[int, int]] = []
    while len(out) < n:
        pair = (rng.randint(low, high), rng.randint(low, high))
        if pair not in taken and pair not in out:
            out.append(pair)
    return out
