//! [`Mismatch`]: one way named tensors do not fit a network's variables.

use tch::Kind;

/// One way named tensors do not fit a network's variables, in a checkpoint load or an import.
#[derive(Debug, Clone, PartialEq)]
pub enum Mismatch {
    /// A variable the source does not have.
    Missing {
        /// The variable's name.
        name: String,
    },
    /// A checkpoint tensor the model has no variable for.
    Unexpected {
        /// The tensor's name.
        name: String,
    },
    /// A source entry no variable takes, with why (`no such variable`, `no variable X`).
    Unused {
        /// The source entry's name.
        source: String,
        /// Why, in words.
        why: String,
    },
    /// A source tensor of another shape than its variable.
    Shape {
        /// The source entry's name.
        source: String,
        /// Its shape.
        got: Vec<i64>,
        /// The variable's shape.
        want: Vec<i64>,
    },
    /// A source tensor whose dtype is not copied (integers and bools into floats, or back).
    Dtype {
        /// The source entry's name.
        source: String,
        /// Its dtype.
        got: Kind,
        /// The variable's dtype.
        want: Kind,
    },
    /// An undefined source tensor.
    Undefined {
        /// The source entry's name.
        source: String,
    },
    /// Two source entries renamed onto one variable.
    Collision {
        /// The first entry.
        first: String,
        /// The second entry.
        second: String,
        /// The variable both map to.
        target: String,
    },
}

impl Mismatch {
    /// The problem in words; `owner` (`model`, `network`) names whose variables are meant.
    pub fn describe(&self, owner: &str) -> String {
        use crate::files::shown;
        match self {
            Self::Missing { name } => format!("missing {}", shown(name)),
            Self::Unexpected { name } => format!("unexpected {}", shown(name)),
            Self::Unused { source, why } => format!("unused {} ({})", shown(source), shown(why)),
            Self::Shape { source, got, want } => {
                format!("{} has shape {got:?}, the {owner} needs {want:?}", shown(source))
            }
            Self::Dtype { source, got, want } => format!(
                "{} has dtype {got:?}, the {owner} needs {want:?} (integer and bool tensors are not cast)",
                shown(source)
            ),
            Self::Undefined { source } => format!("{} is an undefined tensor", shown(source)),
            Self::Collision { first, second, target } => {
                format!("{} and {} both map to {}", shown(first), shown(second), shown(target))
            }
        }
    }

    /// Every problem in words, separated by `; `.
    pub(super) fn list(problems: &[Mismatch], owner: &str) -> String {
        problems.iter().map(|p| p.describe(owner)).collect::<Vec<_>>().join("; ")
    }
}
