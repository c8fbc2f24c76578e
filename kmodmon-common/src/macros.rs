//! One definition for every enum that crosses the kernel/user boundary.
//!
//! [`contract_enum!`](crate::contract_enum) turns one table — variant, `u32` value, stable
//! snake_case name and, where asked, a category — into the `#[repr(u32)]` enum the eBPF programs
//! write, with the `ALL`, `from_u32`, `name` and `from_name` userspace reads it with. The tables
//! of the enums userspace mirrors are macros themselves ([`event_kinds!`](crate::event_kinds),
//! [`sources!`](crate::sources), [`syscall_ops!`](crate::syscall_ops)): each calls back the macro
//! it is given with its rows, so kmodmon builds its own output enums from the same rows instead
//! of copying them.
//!
//! ```
//! kmodmon_common::contract_enum! {
//!     /// A colour.
//!     pub enum Colour;
//!     Red = 1 => "red";
//!     DeepBlue = 2 => "deep_blue";
//! }
//! assert_eq!(Colour::from_u32(2), Some(Colour::DeepBlue));
//! assert_eq!(Colour::DeepBlue.name(), "deep_blue");
//! assert_eq!(Colour::from_name("red"), Some(Colour::Red));
//! assert_eq!(Colour::ALL, [Colour::Red, Colour::DeepBlue]);
//! assert_eq!(Colour::from_u32(3), None);
//! ```

/// How many identifiers it is given (for array lengths).
#[doc(hidden)]
#[macro_export]
macro_rules! __count {
    () => { 0usize };
    ($head:ident $($tail:ident)*) => { 1usize + $crate::__count!($($tail)*) };
}

/// Declares a `#[repr(u32)]` enum from one table of `Variant = value => "name";` rows (see the
/// [module documentation](crate::macros)). With `: category Type` after the name, every row
/// ends in `, category` and the enum gets `category()`.
#[macro_export]
macro_rules! contract_enum {
    (@enum
        [$(#[$meta:meta])*] $vis:vis $name:ident;
        $( [$(#[$vmeta:meta])*] $variant:ident = $value:literal => $sname:literal; )+
    ) => {
        $(#[$meta])*
        #[repr(u32)]
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
        $vis enum $name {
            $( $(#[$vmeta])* $variant = $value, )+
        }

        impl $name {
            /// Every value, in table order.
            pub const ALL: [Self; $crate::__count!($($variant)+)] = [$(Self::$variant,)+];

            /// The value with this number; `None` for a number this table does not have (a
            /// record of another layout).
            pub const fn from_u32(v: u32) -> Option<Self> {
                match v {
                    $( $value => Some(Self::$variant), )+
                    _ => None,
                }
            }

            /// The stable snake_case name output and metrics show.
            pub const fn name(self) -> &'static str {
                match self {
                    $( Self::$variant => $sname, )+
                }
            }

            /// The value with this [`name`](Self::name).
            pub fn from_name(name: &str) -> Option<Self> {
                match name {
                    $( $sname => Some(Self::$variant), )+
                    _ => None,
                }
            }
        }
    };
    (
        $(#[$meta:meta])*
        $vis:vis enum $name:ident: category $cat:ty;
        $( $(#[$vmeta:meta])* $variant:ident = $value:literal => $sname:literal, $vcat:expr; )+
    ) => {
        $crate::contract_enum! {
            @enum [$(#[$meta])*] $vis $name;
            $( [$(#[$vmeta])*] $variant = $value => $sname; )+
        }

        impl $name {
            /// What this value stands for.
            pub const fn category(self) -> $cat {
                match self {
                    $( Self::$variant => $vcat, )+
                }
            }
        }
    };
    (
        $(#[$meta:meta])*
        $vis:vis enum $name:ident;
        $( $(#[$vmeta:meta])* $variant:ident = $value:literal => $sname:literal; )+
    ) => {
        $crate::contract_enum! {
            @enum [$(#[$meta])*] $vis $name;
            $( [$(#[$vmeta])*] $variant = $value => $sname; )+
        }
    };
}

#[cfg(test)]
mod tests {
    #[derive(Debug, PartialEq, Eq)]
    enum Sort {
        Warm,
        Cold,
    }

    crate::contract_enum! {
        /// Test enum.
        enum Colour: category Sort;
        /// The first.
        Red = 1 => "red", Sort::Warm;
        DeepBlue = 7 => "deep_blue", Sort::Cold;
    }

    #[test]
    fn one_table_gives_values_names_and_categories() {
        assert_eq!(Colour::ALL, [Colour::Red, Colour::DeepBlue]);
        assert_eq!(Colour::DeepBlue as u32, 7);
        assert_eq!(Colour::from_u32(7), Some(Colour::DeepBlue));
        assert_eq!(Colour::from_u32(2), None);
        assert_eq!(Colour::Red.name(), "red");
        assert_eq!(Colour::from_name("deep_blue"), Some(Colour::DeepBlue));
        assert_eq!(Colour::from_name("Red"), None);
        assert_eq!(Colour::DeepBlue.category(), Sort::Cold);
        for c in Colour::ALL {
            assert_eq!(Colour::from_u32(c as u32), Some(c));
            assert_eq!(Colour::from_name(c.name()), Some(c));
        }
    }
}
