/**
 * `trainer_state.json` as transformers' `TrainerState.save_to_json` writes it (the fields a
 * single-process run has), so tools that read a transformers output directory read lathe's.
 * `log_history` holds one entry per logging step (`loss`, `learning_rate`, `grad_norm`, trl's
 * `mean_token_accuracy`), one per evaluation (`eval_loss`, `eval_mean_token_accuracy`) and a final
 * summary (`train_loss`, `train_runtime`).
 *
 * With load_best_model_at_end the best evaluation is recorded as recent transformers records it:
 * `best_global_step`, `best_metric` and `best_model_checkpoint` (the checkpoint directory that
 * holds exactly that adapter, or null when no checkpoint was written at that step). Without it,
 * `best_metric` is the best value early stopping has seen and `best_global_step` is left out.
 * @module
 */
/** The best evaluation so far (load_best_model_at_end). */
export interface BestModelRecord {
  /** Optimizer step whose adapter it is (trainer_state.json `best_global_step`). */
  step: number;
  /** Its metric (`best_metric`). */
  metric: number;
  /** The checkpoint that holds exactly that adapter, as trainer_state.json names it; null: none (`best_model_checkpoint`). */
  checkpoint: string | null;
}

/** One `log_history` entry. */
export interface LogEntry {
  step: number;
  epoch: number;
  loss?: number;
  learning_rate?: number;
  grad_norm?: number;
  /** Token slots per second over the logging window (lathe's addition). */
  tokens_per_second?: number;
  /** Share of trained tokens whose argmax logit is the target (trl), mean over the window's steps. */
  mean_token_accuracy?: number;
  eval_loss?: number;
  /** The same over the whole eval split, token-weighted (trl). */
  eval_mean_token_accuracy?: number;
  train_loss?: number;
  train_runtime?: number;
  train_tokens_per_second?: number;
  /** An objective's further metrics (DPO's `rewards/chosen`, `eval_rewards/accuracies`, ...). */
  [metric: string]: number | undefined;
}

/** The JSON object. */
export interface TrainerState {
  /** With load_best_model_at_end only. */
  best_global_step?: number | null;
  best_metric: number | null;
  best_model_checkpoint: string | null;
  epoch: number;
  eval_steps: number | null;
  global_step: number;
  is_hyper_param_search: false;
  is_local_process_zero: true;
  is_world_process_zero: true;
  log_history: LogEntry[];
  logging_steps: number;
  max_steps: number;
  num_input_tokens_seen: number;
  num_train_epochs: number;
  save_steps: number | null;
  total_flos: number;
  train_batch_size: number;
  trial_name: null;
  trial_params: null;
}

/** What {@link trainerState} needs. */
export interface TrainerStateInput {
  step: number;
  epoch: number;
  history: LogEntry[];
  bestEvalLoss: number | null;
  /**
   * With load_best_model_at_end: the best evaluation (null before the first); it sets
   * best_global_step, best_metric and best_model_checkpoint. Absent: best_metric is bestEvalLoss.
   */
  best?: BestModelRecord | null;
  evalSteps: number | null;
  loggingSteps: number;
  maxSteps: number;
  epochs: number;
  saveSteps: number | null;
  tokens: number;
  batchSize: number;
}

/** Builds the state object (keys in transformers' sorted order). */
export function trainerState(s: TrainerStateInput): TrainerState {
  const best = s.best === undefined ? { best_metric: s.bestEvalLoss, best_model_checkpoint: null } : {
    best_global_step: s.best?.step ?? null,
    best_metric: s.best?.metric ?? null,
    best_model_checkpoint: s.best?.checkpoint ?? null,
  };
  return {
    ...best,
    epoch: s.epoch,
    eval_steps: s.evalSteps,
    global_step: s.step,
    is_hyper_param_search: false,
    is_local_process_zero: true,
    is_world_process_zero: true,
    log_history: s.history.map((e) => ({ ...e })),
    logging_steps: s.loggingSteps,
    max_steps: s.maxSteps,
    num_input_tokens_seen: s.tokens,
    num_train_epochs: s.epochs,
    save_steps: s.saveSteps,
    total_flos: 0,
    train_batch_size: s.batchSize,
    trial_name: null,
    trial_params: null,
  };
}
