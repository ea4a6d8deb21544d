/**
 * Writes the demo datasets `data/demo/sft.jsonl` and `data/demo/preference.jsonl`: a small
 * structured-extraction task (a sentence about a shop order -> a compact JSON object with
 * fixed keys) that a tiny model can learn; and `data/demo/corpus.jsonl`, text in the same
 * sentences, requests and words, and JSON records that answer none of them, on which `recipes/demo-base.yaml`
 * pretrains the demo's base (so it knows the language, not the task). The output depends only on the seed below, so
 * running this program reproduces the committed files byte for byte.
 *
 * ```
 * deno run -A scripts/make_demo_data.ts          # (re)write the files
 * deno run -A scripts/make_demo_data.ts --check  # exit 1 if the files differ from the generator
 * ```
 * @module
 */
import { join } from "node:path";
import { writeFileAtomic } from "../foundation/atomic.ts";
import { mulberry32 } from "../foundation/random.ts";

/** Seed of the generator; changing it changes every row. */
export const DEMO_SEED = 20240611;
/** Rows in `sft.jsonl`. */
export const SFT_ROWS = 2000;
/** Rows in `preference.jsonl`. */
export const PREFERENCE_ROWS = 600;
/** Rows of text in `corpus.jsonl` (the demo base's pretraining corpus), and their own seed. */
export const CORPUS_ROWS = 12000;
export const CORPUS_SEED = DEMO_SEED + 1;

class Rng {
  #next: () => number;
  constructor(seed: number) {
    this.#next = mulberry32(seed);
  }
  /** Integer in [0, n). */
  int(n: number): number {
    return Math.floor(this.#next() * n);
  }
  pick<T>(items: readonly T[]): T {
    return items[this.int(items.length)];
  }
  chance(p: number): boolean {
    return this.#next() < p;
  }
}

const NAMES = [
  "Ada",
  "Ben",
  "Cleo",
  "Dev",
  "Eva",
  "Finn",
  "Gia",
  "Hugo",
  "Ines",
  "Jon",
  "Kai",
  "Lena",
  "Milo",
  "Nora",
  "Omar",
  "Pia",
  "Ravi",
  "Sara",
  "Tom",
  "Uma",
  "Vera",
  "Yuki",
  "Zoe",
  "Leo",
] as const;
/** [singular, plural]. */
const ITEMS = [
  ["mug", "mugs"],
  ["lamp", "lamps"],
  ["chair", "chairs"],
  ["book", "books"],
  ["kettle", "kettles"],
  ["scarf", "scarves"],
  ["plate", "plates"],
  ["candle", "candles"],
  ["towel", "towels"],
  ["clock", "clocks"],
  ["basket", "baskets"],
  ["pillow", "pillows"],
] as const;
const COLORS = ["red", "blue", "green", "black", "white", "yellow", "grey", "orange"] as const;
const CITIES = [
  "Lisbon",
  "Oslo",
  "Lima",
  "Cairo",
  "Delhi",
  "Quito",
  "Dublin",
  "Seoul",
  "Perth",
  "Austin",
  "Porto",
  "Nairobi",
  "Zurich",
  "Hanoi",
  "Denver",
] as const;
const MONTHS = [
  "January",
  "February",
  "March",
  "April",
  "May",
  "June",
  "July",
  "August",
  "September",
  "October",
  "November",
  "December",
] as const;
const NUMBER_WORDS = [
  "",
  "one",
  "two",
  "three",
  "four",
  "five",
  "six",
  "seven",
  "eight",
  "nine",
  "ten",
  "eleven",
  "twelve",
] as const;

/** The system prompt some rows carry. */
export const DEMO_SYSTEM_PROMPT =
  "You turn shop orders into JSON with the keys name, item, quantity, color, " +
  "city, month, day. Use null when the color is not given.";

/** One order; the JSON answer has exactly these keys in this order. */
interface Order {
  name: string;
  item: string;
  quantity: number;
  color: string | null;
  city: string;
  month: string;
  day: number;
}

function ordinal(n: number): string {
  const tens = n % 100;
  if (tens >= 11 && tens <= 13) return `${n}th`;
  return `${n}${["th", "st", "nd", "rd"][n % 10] ?? "th"}`;
}

function randomOrder(rng: Rng): Order {
  return {
    name: rng.pick(NAMES),
    item: rng.pick(ITEMS)[0],
    quantity: 1 + rng.int(12),
    color: rng.chance(0.2) ? null : rng.pick(COLORS),
    city: rng.pick(CITIES),
    month: rng.pick(MONTHS),
    day: 1 + rng.int(28),
  };
}

/** "3 blue mugs", "an orange lamp", "seven scarves". */
function things(o: Order, rng: Rng): string {
  const [singular, plural] = ITEMS.find(([s]) => s === o.item)!;
  const noun = `${o.color ? `${o.color} ` : ""}${o.quantity === 1 ? singular : plural}`;
  if (o.quantity === 1 && rng.chance(0.5)) return `${/^[aeiou]/.test(noun) ? "an" : "a"} ${noun}`;
  return `${rng.chance(0.5) ? NUMBER_WORDS[o.quantity] : String(o.quantity)} ${noun}`;
}

function date(o: Order, rng: Rng): string {
  const day = rng.chance(0.3) ? ordinal(o.day) : String(o.day);
  return rng.chance(0.5) ? `${o.month} ${day}` : `${day} ${o.month}`;
}

const TEMPLATES: readonly ((o: Order, rng: Rng) => string)[] = [
  (o, r) => `${o.name} ordered ${things(o, r)} on ${date(o, r)}, shipping to ${o.city}.`,
  (o, r) => `On ${date(o, r)}, ${o.name} from ${o.city} bought ${things(o, r)}.`,
  (o, r) => `Please ship ${things(o, r)} to ${o.name} in ${o.city} by ${date(o, r)}.`,
  (o, r) => `${o.name} (${o.city}) wants ${things(o, r)}, due ${date(o, r)}.`,
  (o, r) => `New order from ${o.city}: ${things(o, r)} for ${o.name}, delivery on ${date(o, r)}.`,
  (o, r) => `${o.city} shop, ${date(o, r)}: ${o.name} picked up ${things(o, r)}.`,
  (o, r) =>
    `Deliver ${things(o, r)} to ${o.city} on the ${ordinal(o.day)} of ${o.month}; the buyer is ${o.name}.`,
];

const REQUESTS: readonly ((sentence: string) => string)[] = [
  (s) => `Extract the order as JSON: ${s}`,
  (s) => `${s}\nReturn the order as JSON.`,
  (s) => `Turn this into JSON: ${s}`,
  (s) => `Order: ${s}\nJSON:`,
];

/** The answer: compact JSON, keys in fixed order. */
function answer(o: Order): string {
  return JSON.stringify({
    name: o.name,
    item: o.item,
    quantity: o.quantity,
    color: o.color,
    city: o.city,
    month: o.month,
    day: o.day,
  });
}

interface Message {
  role: "system" | "user" | "assistant";
  content: string;
}

/** A fresh order and its sentence; sentences never repeat across both files. */
function freshOrder(rng: Rng, used: Set<string>): { order: Order; sentence: string } {
  while (true) {
    const order = randomOrder(rng);
    const sentence = rng.pick(TEMPLATES)(order, rng);
    if (!used.has(sentence)) {
      used.add(sentence);
      return { order, sentence };
    }
  }
}

/** A follow-up turn that edits the order, and the edited order. */
function followUp(o: Order, rng: Rng): { text: string; order: Order } {
  switch (rng.int(3)) {
    case 0: {
      const quantity = o.quantity === 12 ? 1 + rng.int(11) : o.quantity + 1 + rng.int(12 - o.quantity);
      return { text: `Change the quantity to ${quantity}.`, order: { ...o, quantity } };
    }
    case 1: {
      const city = rng.pick(CITIES.filter((c) => c !== o.city));
      return { text: `Actually it ships to ${city}.`, order: { ...o, city } };
    }
    default: {
      const color = rng.pick(COLORS.filter((c) => c !== o.color));
      return { text: `Make it ${color}.`, order: { ...o, color } };
    }
  }
}

function sftRow(rng: Rng, used: Set<string>): Message[] {
  const { order, sentence } = freshOrder(rng, used);
  const messages: Message[] = [];
  const system = rng.chance(0.15);
  if (system) messages.push({ role: "system", content: DEMO_SYSTEM_PROMPT });
  const bare = system && rng.chance(0.5);
  messages.push({ role: "user", content: bare ? sentence : rng.pick(REQUESTS)(sentence) });
  messages.push({ role: "assistant", content: answer(order) });
  if (rng.chance(0.05)) {
    if (rng.chance(0.5)) {
      const next = freshOrder(rng, used);
      messages.push({ role: "user", content: `Now this one: ${next.sentence}` });
      messages.push({ role: "assistant", content: answer(next.order) });
    } else {
      const edit = followUp(order, rng);
      messages.push({ role: "user", content: edit.text });
      messages.push({ role: "assistant", content: answer(edit.order) });
    }
  }
  return messages;
}

/** A plausible wrong extraction: a swapped, missing, invented or altered field. */
function corrupt(o: Order, rng: Rng): string {
  const keys = ["name", "item", "quantity", "color", "city", "month", "day"] as const;
  switch (rng.int(6)) {
    case 0: // name and city swapped
      return answer({ ...o, name: o.city, city: o.name });
    case 1: { // a field left out
      const drop = rng.pick(keys);
      const obj: Record<string, unknown> = JSON.parse(answer(o));
      delete obj[drop];
      return JSON.stringify(obj);
    }
    case 2: // color invented or lost
      return answer({ ...o, color: o.color === null ? rng.pick(COLORS) : null });
    case 3: { // wrong quantity
      const quantity = o.quantity === 1 ? 2 + rng.int(11) : o.quantity - 1;
      return answer({ ...o, quantity });
    }
    case 4: { // wrong month
      const month = MONTHS[(MONTHS.indexOf(o.month as typeof MONTHS[number]) + 1 + rng.int(11)) % 12];
      return answer({ ...o, month });
    }
    default: // the plural noun instead of the item
      return answer({ ...o, item: ITEMS.find(([s]) => s === o.item)![1] });
  }
}

/**
 * The facts of an order restated in words, in the answer's key order: "The buyer is Ada. The item is
 * mug, quantity 3, color blue. It ships to Lisbon on May 4." Restating the sentence just before it,
 * this is where the base learns to carry a name, a city or a number across the text (and that
 * "seven scarves" is the item scarf, quantity 7) without ever seeing the JSON.
 */
function statement(o: Order): string {
  return `The buyer is ${o.name}. The item is ${o.item}, quantity ${o.quantity}` +
    (o.color === null ? ", no color" : `, color ${o.color}`) +
    `. It ships to ${o.city} on ${o.month} ${o.day}.`;
}

/** The answer's keys, in its order. */
const KEYS = ["name", "item", "quantity", "color", "city", "month", "day"] as const;

/**
 * A JSON record of two to five of an order's fields, keys in a random order: `{"city":"Oslo","day":4}`.
 * Never all seven in the answer's order and never after a sentence, so it answers nothing: the base
 * learns JSON's syntax, the keys and how values are written in it, as any pretrained model has, and
 * the task (a sentence in, its seven fields out in JSON) is left to SFT. Without these rows the
 * answer's punctuation and keys are tokens the base never saw: their embeddings (tied to the output)
 * all drift along one shared direction while the seen tokens push them down, so no adapter can tell
 * `":"` from `","` and SFT spends itself on the format instead of the values.
 */
function record(o: Order, rng: Rng): string {
  const keys: (typeof KEYS[number])[] = [...KEYS];
  for (let i = keys.length - 1; i > 0; i--) {
    const j = rng.int(i + 1);
    [keys[i], keys[j]] = [keys[j], keys[i]];
  }
  const fields: Record<string, unknown> = {};
  for (const key of keys.slice(0, 2 + rng.int(4))) fields[key] = o[key];
  return JSON.stringify(fields);
}

/**
 * One row of the corpus: one order as the task's users write it (in any template, inside a request or
 * followed by an edit), most often followed by the statement of its facts in words, never JSON; or a
 * few JSON records of other orders ({@link record}), with no sentence. One order per sentence row:
 * training packs rows without attention across them, so the statement can only refer to its own
 * sentence, as an answer refers to its prompt.
 */
function corpusRow(rng: Rng): string {
  if (rng.chance(0.2)) return [0, 1, 2].map(() => record(randomOrder(rng), rng)).join("\n");
  const o = randomOrder(rng);
  const sentence = rng.pick(TEMPLATES)(o, rng);
  switch (rng.int(4)) {
    case 0:
      return `${rng.pick(REQUESTS)(sentence)}\n${statement(o)}`;
    case 1: {
      const edit = followUp(o, rng);
      return `${sentence} ${edit.text} ${statement(edit.order)}`;
    }
    case 2:
      return `${sentence} ${statement(o)}`;
    default:
      return sentence;
  }
}

/** `corpus.jsonl`: {@link CORPUS_ROWS} rows `{"text": ...}` from their own seeded stream. */
function corpus(): string {
  const rng = new Rng(CORPUS_SEED);
  const rows: string[] = [];
  for (let i = 0; i < CORPUS_ROWS; i++) rows.push(JSON.stringify({ text: corpusRow(rng) }));
  return rows.join("\n") + "\n";
}

/** Rows of both files, from one seeded stream (SFT first). */
function generate(): { sft: string; preference: string } {
  const rng = new Rng(DEMO_SEED);
  const used = new Set<string>();
  const sft: string[] = [];
  for (let i = 0; i < SFT_ROWS; i++) sft.push(JSON.stringify({ messages: sftRow(rng, used) }));
  const preference: string[] = [];
  for (let i = 0; i < PREFERENCE_ROWS; i++) {
    const { order, sentence } = freshOrder(rng, used);
    const prompt = rng.pick(REQUESTS)(sentence);
    preference.push(JSON.stringify({ prompt, chosen: answer(order), rejected: corrupt(order, rng) }));
  }
  return { sft: sft.join("\n") + "\n", preference: preference.join("\n") + "\n" };
}

/** The text of `sft.jsonl`, `preference.jsonl` and `corpus.jsonl`, exactly as committed. */
export function demoDatasets(): { "sft.jsonl": string; "preference.jsonl": string; "corpus.jsonl": string } {
  const { sft, preference } = generate();
  return { "sft.jsonl": sft, "preference.jsonl": preference, "corpus.jsonl": corpus() };
}

if (import.meta.main) {
  const dir = join(import.meta.dirname!, "..", "data", "demo");
  const check = Deno.args.includes("--check");
  let differ = false;
  for (const [name, text] of Object.entries(demoDatasets())) {
    const path = join(dir, name);
    if (check) {
      const current = await Deno.readTextFile(path).catch(() => null);
      if (current !== text) {
        console.error(`${path} differs from the generator's output`);
        differ = true;
      }
    } else {
      await writeFileAtomic(path, text);
      console.log(
        `wrote ${path} (${text.split("\n").length - 1} rows, ${new TextEncoder().encode(text).length} bytes)`,
      );
    }
  }
  if (differ) Deno.exit(1);
}
