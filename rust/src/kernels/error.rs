//! Errors the kernels report instead of panicking. Each names the argument at fault.

use std::fmt;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KernelError {
    /// An argument's shape, strides or contents are unusable; the text says how.
    InvalidArgument {
        argument: &'static str,
        message: String,
    },
    /// Rows that have no token with the requested id, in row order.
    TokenNotFound { token_id: i64, rows: Vec<usize> },
}

impl KernelError {
    pub fn invalid(argument: &'static str, message: impl Into<String>) -> Self {
        KernelError::InvalidArgument {
            argument,
            message: message.into(),
        }
    }
}

impl fmt::Display for KernelError {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            KernelError::InvalidArgument { argument, message } => {
                write!(formatter, "{argument}: {message}")
            }
            KernelError::TokenNotFound { token_id, rows } => {
                const SHOWN: usize = 20;
                let listed: Vec<String> = rows.iter().take(SHOWN).map(|r| r.to_string()).collect();
                let more = if rows.len() > SHOWN {
                    format!(" and {} more", rows.len() - SHOWN)
                } else {
                    String::new()
                };
                write!(
                    formatter,
                    "input_ids: no real token equals eos_token_id={token_id} in {} row(s): {}{more}",
                    rows.len(),
                    listed.join(", ")
                )
            }
        }
    }
}

impl std::error::Error for KernelError {}
