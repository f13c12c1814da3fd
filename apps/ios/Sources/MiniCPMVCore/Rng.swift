/// SplitMix64, the portable generator every app samples from (edge_runtime/portable_rng.py,
/// docs/conformance.md "The portable RNG"). `UInt64` arithmetic with the wrapping operators
/// (`&+`, `&*`) is exactly the reference's arithmetic mod 2^64.
public struct SplitMix64: Sendable {
    /// The seed as given.
    public let seed: UInt64
    private var state: UInt64

    public init(seed: UInt64) {
        self.seed = seed
        self.state = seed
    }

    /// The next 64-bit output.
    public mutating func nextU64() -> UInt64 {
        state = state &+ 0x9E37_79B9_7F4A_7C15
        var z = state
        z = (z ^ (z >> 30)) &* 0xBF58_476D_1CE4_E5B9
        z = (z ^ (z >> 27)) &* 0x94D0_49BB_1331_11EB
        return z ^ (z >> 31)
    }

    /// A double in [0, 1): the top 53 bits of the next output times 2^-53 (exact, no rounding).
    public mutating func random() -> Double {
        Double(nextU64() >> 11) * 0x1.0p-53
    }
}
