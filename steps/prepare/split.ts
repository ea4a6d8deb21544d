/**
 * Deterministic, stable assignment of rows by hashing their ids with a seed. A row's fate
 * depends only on the seed and its own id, so adding, removing or reordering other rows
 * never moves it between train and eval.
 * @module
 */
import { sha256Hex } from "../../foundation/hash.ts";

/** sha256 of `text` read as a fraction in [0, 1): its first 52 bits / 2^52. */
export function hashFraction(text: string): number {
  return parseInt(sha256Hex(text).slice(0, 13), 16) / 2 ** 52;
}

/** The split fraction of a row: sha256(seed + ":" + id) as a fraction in [0, 1). */
export function splitFraction(seed: number, id: string): number {
  return hashFraction(`${seed}:${id}`);
}

/** True when a row belongs to eval: its split fraction is below `evalFraction`. */
export function isEvalRow(seed: number, id: string, evalFraction: number): boolean {
  return evalFraction > 0 && splitFraction(seed, id) < evalFraction;
}

/**
 * How many times a training row is written for a source of `weight`: floor(weight), plus
 * one when sha256(seed + ":weight:" + id) as a fraction is below the fractional part.
 * A weight of 0.25 keeps about a quarter of the rows (the others are written 0 times).
 */
export function weightCopies(seed: number, id: string, weight: number): number {
  const whole = Math.floor(weight);
  const part = weight - whole;
  if (part === 0) return whole;
  return whole + (hashFraction(`${seed}:weight:${id}`) < part ? 1 : 0);
}
