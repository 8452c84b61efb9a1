//! Enums whose variants have a name on the wire and in stores: [`named_enum!`] declares one with
//! its `ALL` variants, `as_str`, `from_name` and `Display`, so that no caller compares a state or
//! a kind as a string literal and no two enums write that mapping by hand.

/// Declares an enum and its wire names: `named_enum! { pub enum State { Running = "running", … } }`.
/// Attributes (derives, serde, docs) pass through to the enum and its variants. The enum gets
/// `ALL` (every variant, in order), `as_str` (its name), `from_name` (the variant of a name, if
/// any) and a `Display` that writes the name.
#[macro_export]
macro_rules! named_enum {
    (
        $(#[$meta:meta])*
        $vis:vis enum $name:ident {
            $( $(#[$variant_meta:meta])* $variant:ident = $wire:literal ),+ $(,)?
        }
    ) => {
        $(#[$meta])*
        $vis enum $name {
            $( $(#[$variant_meta])* $variant ),+
        }

        impl $name {
            /// Every variant, in declaration order.
            pub const ALL: [$name; [$($wire),+].len()] = [$($name::$variant),+];

            /// The variant's name on the wire.
            pub fn as_str(self) -> &'static str {
                match self {
                    $( $name::$variant => $wire ),+
                }
            }

            /// The variant named `name`, if any is.
            pub fn from_name(name: &str) -> Option<$name> {
                $name::ALL.into_iter().find(|variant| variant.as_str() == name)
            }
        }

        impl ::std::fmt::Display for $name {
            fn fmt(&self, f: &mut ::std::fmt::Formatter<'_>) -> ::std::fmt::Result {
                f.write_str(self.as_str())
            }
        }
    };
}

#[cfg(test)]
mod tests {
    crate::named_enum! {
        #[derive(Debug, Clone, Copy, PartialEq, Eq)]
        enum Light {
            Red = "red",
            /// Variant attributes pass through.
            Green = "green",
        }
    }

    #[test]
    fn names_round_trip() {
        assert_eq!(Light::ALL, [Light::Red, Light::Green]);
        for light in Light::ALL {
            assert_eq!(Light::from_name(light.as_str()), Some(light));
            assert_eq!(light.to_string(), light.as_str());
        }
        assert_eq!(Light::Green.as_str(), "green");
        assert_eq!(Light::from_name("blue"), None);
        assert_eq!(Light::from_name("Red"), None);
    }
}
