/**
 * An LLM judge through an OpenAI-compatible chat-completions endpoint (what llama.cpp's server,
 * Ollama, vLLM and OpenAI expose): for each sample, the prompt template with `{prompt}`,
 * `{reference}` and `{output}` filled in goes to `POST <url>/chat/completions` as one user
 * message (temperature 0); the first number from 1 to 10 in the answer is the score.
 *
 * The key is read from the environment variable the config names (never from the config), sent
 * only in the Authorization header, and never written to a file, a log, an error or the tracker.
 * @module
 */
import { LatheError } from "../../foundation/errors.ts";

/** The judge's settings (the eval step's `judge` key). */
export interface JudgeSettings {
  /** Base URL of the API, e.g. http://localhost:8080/v1. */
  url: string;
  /** The model name the endpoint serves. */
  model: string;
  /** The template: {prompt}, {reference}, {output}. */
  prompt: string;
  /** Environment variable holding the API key, or null for none. */
  keyEnv: string | null;
}

/** The default judging prompt. */
export const DEFAULT_JUDGE_PROMPT = "You grade an assistant's answer against a reference answer.\n\n" +
  "Question:\n{prompt}\n\nReference answer:\n{reference}\n\nAssistant's answer:\n{output}\n\n" +
  "How correct and complete is the assistant's answer? Reply with one number from 1 (wrong) to 10 (as good as the reference).";

/** The first score from 1 to 10 in a judge's reply, or null. */
export function parseScore(text: string): number | null {
  const m = text.match(/(?<![\d.])(10|[1-9])(?:\.\d+)?(?![\d])/);
  return m ? Number(m[0]) : null;
}

/** Fills the template. */
export function judgePrompt(
  template: string,
  sample: { prompt: string; reference: string; output: string },
): string {
  return template.replaceAll("{prompt}", sample.prompt).replaceAll("{reference}", sample.reference)
    .replaceAll("{output}", sample.output);
}

/** Scores one sample; null when the reply holds no score. */
export async function judge(
  settings: JudgeSettings,
  sample: { prompt: string; reference: string; output: string },
): Promise<number | null> {
  const key = settings.keyEnv ? Deno.env.get(settings.keyEnv) : undefined;
  if (settings.keyEnv && !key) {
    throw new LatheError(
      `Cannot ask the judge: the environment variable ${settings.keyEnv} (eval.judge.key_env) is not set`,
      {
        hint:
          `export ${settings.keyEnv}=... before running, or set eval.judge.key_env to null for an endpoint without a key`,
      },
    );
  }
  const url = `${settings.url.replace(/\/+$/, "")}/chat/completions`;
  let response: Response;
  try {
    response = await fetch(url, {
      method: "POST",
      headers: { "content-type": "application/json", ...(key ? { authorization: `Bearer ${key}` } : {}) },
      body: JSON.stringify({
        model: settings.model,
        messages: [{ role: "user", content: judgePrompt(settings.prompt, sample) }],
        temperature: 0,
      }),
    });
  } catch (error) {
    throw new LatheError(`Cannot reach the judge at ${url}: ${(error as Error).message}`, {
      hint: "start the judge's server (llama.cpp's llama-server, Ollama, vLLM), or fix eval.judge.url",
    });
  }
  const text = await response.text();
  if (!response.ok) {
    throw new LatheError(`Cannot ask the judge at ${url}: HTTP ${response.status} ${text.slice(0, 200)}`, {
      hint: response.status === 401 || response.status === 403
        ? `check the key in ${settings.keyEnv ?? "(no key_env set)"}`
        : "check eval.judge.url and eval.judge.model",
    });
  }
  let content: unknown;
  try {
    content = JSON.parse(text)?.choices?.[0]?.message?.content;
  } catch {
    content = undefined;
  }
  if (typeof content !== "string") {
    throw new LatheError(
      `Cannot read the judge's answer from ${url}: no choices[0].message.content in ${text.slice(0, 200)}`,
    );
  }
  return parseScore(content);
}
