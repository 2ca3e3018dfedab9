//! The training loop: [`Trainer::run`] takes gradient steps until the run is done, keeps the one
//! checkpoint schedule of a run folder, and calls [`TrainHooks`] for everything else — the
//! metrics log, progress, evaluation, sample grids, stopping on Ctrl-C.
//!
//! Checkpoints (when a run folder is set): after every `save_every_epochs`-th epoch that is not
//! the end of this call, and once when the call ends (finished, step limit reached or stopped).
//! The loop writes no metrics itself: a [`MetricsLog`] is a hook (`metrics.jsonl`, `metrics.csv`
//! and TensorBoard files), so a run folder has one metrics writer, the one its caller passes.

use std::path::{Path, PathBuf};

use anyhow::Result;

use super::trainer::{StepMetrics, Trainer};
use crate::logging::MetricsLog;
use crate::nn::VelocityField;
use crate::reward::Reward;

/// What a caller of [`Trainer::run`] hooks into; every method does nothing by default. An error
/// from a hook stops the run with that error (no checkpoint is saved for it).
pub trait TrainHooks<M: VelocityField> {
    /// After every gradient step, with that step's metrics.
    fn on_step(&mut self, _trainer: &Trainer<M>, _m: &StepMetrics) -> Result<()> {
        Ok(())
    }
    /// After a step that ended an epoch (the sampling policy has just been refreshed; `m` is that
    /// step's metrics, `trainer.epoch()` the epochs completed), before that epoch's checkpoint.
    /// The run's reward is lent for evaluations.
    fn on_epoch(&mut self, _trainer: &Trainer<M>, _reward: &mut dyn Reward, _m: &StepMetrics) -> Result<()> {
        Ok(())
    }
    /// After a checkpoint was saved (in the folder `path`).
    fn on_checkpoint(&mut self, _trainer: &Trainer<M>, _path: &Path) -> Result<()> {
        Ok(())
    }
    /// Asked after every step (after `on_step`, `on_epoch` and any checkpoint of that step):
    /// `true` ends the run there, as when it is done (the end checkpoint is saved).
    fn should_stop(&mut self, _trainer: &Trainer<M>) -> bool {
        false
    }
}

/// No hooks.
impl<M: VelocityField> TrainHooks<M> for () {}

/// The run folder's metrics log: one record per step.
impl<M: VelocityField> TrainHooks<M> for MetricsLog {
    fn on_step(&mut self, _trainer: &Trainer<M>, m: &StepMetrics) -> Result<()> {
        self.log(m)
    }
}

/// A closure called with every step's metrics.
pub struct OnStep<F>(pub F);

impl<M: VelocityField, F: FnMut(&StepMetrics)> TrainHooks<M> for OnStep<F> {
    fn on_step(&mut self, _trainer: &Trainer<M>, m: &StepMetrics) -> Result<()> {
        (self.0)(m);
        Ok(())
    }
}

impl<M: VelocityField, H: TrainHooks<M> + ?Sized> TrainHooks<M> for &mut H {
    fn on_step(&mut self, trainer: &Trainer<M>, m: &StepMetrics) -> Result<()> {
        (**self).on_step(trainer, m)
    }
    fn on_epoch(&mut self, trainer: &Trainer<M>, reward: &mut dyn Reward, m: &StepMetrics) -> Result<()> {
        (**self).on_epoch(trainer, reward, m)
    }
    fn on_checkpoint(&mut self, trainer: &Trainer<M>, path: &Path) -> Result<()> {
        (**self).on_checkpoint(trainer, path)
    }
    fn should_stop(&mut self, trainer: &Trainer<M>) -> bool {
        (**self).should_stop(trainer)
    }
}

/// Two hooks, the first called first; the run stops when either asks.
impl<M: VelocityField, A: TrainHooks<M>, B: TrainHooks<M>> TrainHooks<M> for (A, B) {
    fn on_step(&mut self, trainer: &Trainer<M>, m: &StepMetrics) -> Result<()> {
        self.0.on_step(trainer, m)?;
        self.1.on_step(trainer, m)
    }
    fn on_epoch(&mut self, trainer: &Trainer<M>, reward: &mut dyn Reward, m: &StepMetrics) -> Result<()> {
        self.0.on_epoch(trainer, reward, m)?;
        self.1.on_epoch(trainer, reward, m)
    }
    fn on_checkpoint(&mut self, trainer: &Trainer<M>, path: &Path) -> Result<()> {
        self.0.on_checkpoint(trainer, path)?;
        self.1.on_checkpoint(trainer, path)
    }
    fn should_stop(&mut self, trainer: &Trainer<M>) -> bool {
        // both are asked, so that neither misses a step
        let a = self.0.should_stop(trainer);
        let b = self.1.should_stop(trainer);
        a || b
    }
}

/// How a call of [`Trainer::run`] ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RunEnd {
    /// A hook's `should_stop` ended it (otherwise: training finished or the step limit was reached).
    pub stopped: bool,
    /// The checkpoint saved at the end (`None` without a run folder).
    pub checkpoint: Option<PathBuf>,
}

impl<M: VelocityField> Trainer<M> {
    /// Train until the configured epochs are done, for at most `max_steps` more steps, or until a
    /// hook asks to stop, calling `hooks` along the way and checkpointing on the run's schedule
    /// (see the module docs).
    pub fn run(&mut self, reward: &mut dyn Reward, max_steps: Option<u64>, hooks: &mut dyn TrainHooks<M>) -> Result<RunEnd> {
        let stop_at = max_steps.map_or(self.cfg.total_steps(), |m| (self.step + m).min(self.cfg.total_steps()));
        let mut saved: Option<(u64, PathBuf)> = None;
        let mut stopped = false;
        while self.step < stop_at {
            let m = self.train_step(reward)?;
            hooks.on_step(self, &m)?;
            if m.policy_refreshed {
                hooks.on_epoch(self, reward, &m)?;
                let every = self.cfg.save_every_epochs;
                if self.run_dir.is_some() && every > 0 && self.epoch.is_multiple_of(every) && self.step < stop_at {
                    let p = self.save_checkpoint()?;
                    hooks.on_checkpoint(self, &p)?;
                    saved = Some((self.step, p));
                }
            }
            if hooks.should_stop(self) {
                stopped = true;
                break;
            }
        }
        let mut checkpoint = None;
        if self.run_dir.is_some() {
            checkpoint = Some(match saved {
                // stopped right after the scheduled save of this very step
                Some((s, p)) if s == self.step => p,
                _ => {
                    let p = self.save_checkpoint()?;
                    hooks.on_checkpoint(self, &p)?;
                    p
                }
            });
        }
        Ok(RunEnd { stopped, checkpoint })
    }
}
