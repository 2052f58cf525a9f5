//! The layers a view reads through, topmost first, and how a block resolves in them: to the
//! topmost layer that holds it (data or zero), or to nothing (reads as zeroes).
//!
//! Each layer's summary bits let a lookup skip layers that hold nothing within 2 MiB of the
//! block, so deep chains cost one in-cache bit test per empty layer.

use std::sync::Arc;

use super::{BlockState, Layer};

/// Where a block's content comes from; the index is the layer's position (0 = top).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Hit {
    Unallocated,
    Data(usize),
    Zero(usize),
}

impl Hit {
    /// `qemu:allocation-depth`: 0 unallocated, 1 the top layer, 2 the one below, ...
    pub fn depth(self) -> u32 {
        match self {
            Hit::Unallocated => 0,
            Hit::Data(i) | Hit::Zero(i) => i as u32 + 1,
        }
    }
}

#[derive(Debug, Clone)]
pub struct Chain {
    layers: Vec<Arc<Layer>>,
}

impl Chain {
    pub fn new(layers: Vec<Arc<Layer>>) -> Chain {
        assert!(!layers.is_empty(), "a chain has at least one layer");
        Chain { layers }
    }

    pub fn top(&self) -> &Arc<Layer> {
        &self.layers[0]
    }

    pub fn layers(&self) -> &[Arc<Layer>] {
        &self.layers
    }

    pub fn layer(&self, index: usize) -> &Arc<Layer> {
        &self.layers[index]
    }

    /// The position of the layer with this id, if the chain holds it.
    pub fn position(&self, id: &str) -> Option<usize> {
        self.layers.iter().position(|l| l.id() == id)
    }

    /// The chain below the top layer (None when the top is the only one).
    pub fn below_top(&self) -> Option<Chain> {
        (self.layers.len() > 1).then(|| Chain {
            layers: self.layers[1..].to_vec(),
        })
    }

    pub fn hit(&self, block: u64) -> Hit {
        for (i, layer) in self.layers.iter().enumerate() {
            match layer.state(block) {
                BlockState::Absent => continue,
                BlockState::Data => return Hit::Data(i),
                BlockState::Zero => return Hit::Zero(i),
            }
        }
        Hit::Unallocated
    }

    /// Blocks `[start, end)` as runs of equal hits, in order, covering the range exactly.
    pub fn runs(&self, start: u64, end: u64) -> Vec<(u64, u64, Hit)> {
        self.runs_within(start, end, RunBudget::UNLIMITED)
    }

    /// As [`Chain::runs`], but only as far as `budget` goes: runs covering `[start, x)` for
    /// some `x` past `start` (the whole range when the budget lasts).
    pub fn runs_within(&self, start: u64, end: u64, budget: RunBudget) -> Vec<(u64, u64, Hit)> {
        let mut runs: Vec<(u64, u64, Hit)> = Vec::new();
        let mut block = start;
        let mut steps = 0u64;
        while block < end && !budget.spent(steps, runs.len()) {
            steps += 1;
            let hit = self.hit(block);
            let next = match hit {
                // Nothing up to the next candidate of any layer can be allocated.
                Hit::Unallocated => self
                    .layers
                    .iter()
                    .map(|l| l.map().next_candidate(block + 1, end))
                    .min()
                    .unwrap_or(end)
                    .max(block + 1),
                _ => block + 1,
            };
            match runs.last_mut() {
                Some(run) if run.1 == block && run.2 == hit => run.1 = next,
                _ => runs.push((block, next, hit)),
            }
            block = next;
        }
        runs
    }

    /// Blocks `[start, end)` as runs of "changed in one of the top `top_layers` layers" (true)
    /// or not: the dirty bitmap since the snapshot whose layer sits right below them.
    pub fn changed_runs(&self, top_layers: usize, start: u64, end: u64) -> Vec<(u64, u64, bool)> {
        self.changed_runs_within(top_layers, start, end, RunBudget::UNLIMITED)
    }

    /// As [`Chain::changed_runs`], only as far as `budget` goes (see [`Chain::runs_within`]).
    pub fn changed_runs_within(
        &self,
        top_layers: usize,
        start: u64,
        end: u64,
        budget: RunBudget,
    ) -> Vec<(u64, u64, bool)> {
        let layers = &self.layers[..top_layers.min(self.layers.len())];
        let mut runs: Vec<(u64, u64, bool)> = Vec::new();
        let mut block = start;
        let mut steps = 0u64;
        while block < end && !budget.spent(steps, runs.len()) {
            steps += 1;
            let changed = layers.iter().any(|l| l.state(block) != BlockState::Absent);
            let next = if changed {
                block + 1
            } else {
                layers
                    .iter()
                    .map(|l| l.map().next_candidate(block + 1, end))
                    .min()
                    .unwrap_or(end)
                    .max(block + 1)
            };
            match runs.last_mut() {
                Some(run) if run.1 == block && run.2 == changed => run.1 = next,
                _ => runs.push((block, next, changed)),
            }
            block = next;
        }
        runs
    }
}

/// How far a walk of runs may go: at most `max_runs` runs (the walk stops once it has more) and
/// `max_steps` steps. A step is one block, or one jump over blocks no layer holds, so the work
/// is bounded wherever the data lies.
#[derive(Debug, Clone, Copy)]
pub struct RunBudget {
    pub max_runs: usize,
    pub max_steps: u64,
}

impl RunBudget {
    pub const UNLIMITED: RunBudget = RunBudget {
        max_runs: usize::MAX,
        max_steps: u64::MAX,
    };

    fn spent(&self, steps: u64, runs: usize) -> bool {
        steps >= self.max_steps || runs > self.max_runs
    }
}
