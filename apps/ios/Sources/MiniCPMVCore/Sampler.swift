import Foundation

/// Token sampling, a port of edge_runtime/generation.py (SamplingConfig, Sampler and the apply_*
/// processors) following docs/conformance.md "Sampling, step by step": repetition penalty ->
/// (greedy: argmax) -> temperature -> top-k -> top-p -> float64 softmax -> inverse-CDF draw in index
/// order with one SplitMix64 random() per sampled token. The reference works on float32 logits; Swift
/// `Float` arithmetic is that arithmetic. Softmax sums use numpy's pairwise summation so the
/// probabilities match the reference bit for bit (up to the platform's exp); running sums (top-p,
/// the CDF) are sequential like np.cumsum.

/// Decoding knobs with Hugging Face `generate` semantics; the defaults are greedy decoding.
public struct SamplingConfig: Sendable, Equatable {
    public var maxNewTokens: Int = 64
    /// 0: greedy (argmax); topK / topP are then ignored.
    public var temperature: Double = 0
    /// 0: off.
    public var topK: Int = 0
    /// 1.0: off.
    public var topP: Double = 1
    /// 1.0: off; applied in greedy mode too.
    public var repetitionPenalty: Double = 1
    public var seed: UInt64 = 0
    /// Ids that end generation (never part of the output); empty: the bundle's.
    public var stopIds: [Int] = []

    public init() {}

    public var greedy: Bool { temperature == 0 }

    /// Every bad value at once (empty when the settings are valid).
    public func problems() -> [String] {
        var out = [String]()
        if maxNewTokens < 1 { out.append("maxNewTokens must be an integer >= 1, got \(maxNewTokens)") }
        if !(temperature.isFinite && temperature >= 0) {
            out.append("temperature must be >= 0 (0 = greedy), got \(temperature)")
        }
        if topK < 0 { out.append("topK must be an integer >= 0 (0 = off), got \(topK)") }
        if !(topP > 0 && topP <= 1) { out.append("topP must be in (0, 1] (1 = off), got \(topP)") }
        if !(repetitionPenalty.isFinite && repetitionPenalty > 0) {
            out.append("repetitionPenalty must be > 0 (1 = off), got \(repetitionPenalty)")
        }
        for id in stopIds where id < 0 { out.append("stop ids must be integers >= 0, got \(id)") }
        return out
    }
}

public enum SamplingMath {
    /// HF RepetitionPenaltyLogitsProcessor: seen logits < 0 are multiplied by p, the rest divided (float32).
    public static func repetitionPenalty(_ scores: [Float], seen: [Int], penalty: Double) -> [Float] {
        if penalty == 1 || seen.isEmpty { return scores }
        let p = Float(penalty)
        var out = scores
        var done = Set<Int>()
        for id in seen where id >= 0 && id < out.count && done.insert(id).inserted {
            let s = out[id]
            out[id] = s < 0 ? s * p : s / p
        }
        return out
    }

    /// HF TemperatureLogitsWarper (float32 division; skipped at 1.0).
    public static func temperature(_ scores: [Float], _ t: Double) -> [Float] {
        if t == 1 { return scores }
        let tf = Float(t)
        return scores.map { $0 / tf }
    }

    /// HF TopKLogitsWarper: every score below the k-th largest becomes -inf (ties with it survive).
    public static func topK(_ scores: [Float], _ k: Int) -> [Float] {
        if k <= 0 || k >= scores.count { return scores }
        let kth = scores.sorted(by: >)[k - 1]
        return scores.map { $0 < kth ? -Float.infinity : $0 }
    }

    /// HF TopPLogitsWarper: sort ascending (stable), float64 softmax in that order, running sum; drop
    /// the tokens whose running sum is <= 1 - topP, always keep the most likely one.
    public static func topP(_ scores: [Float], _ p: Double) -> [Float] {
        if p >= 1 { return scores }
        let order = stableArgsort(scores)
        let probs = softmax64(order.map { Double(scores[$0]) })
        let limit = 1 - p
        var out = scores
        var cumulative = 0.0
        for j in 0..<(scores.count - 1) {
            cumulative += probs[j]
            if cumulative <= limit {
                out[order[j]] = -Float.infinity
            }
        }
        return out
    }

    /// Stable ascending argsort (ties keep index order; -0 equals +0), as np.argsort(kind="stable").
    public static func stableArgsort(_ scores: [Float]) -> [Int] {
        scores.indices.sorted { a, b in
            scores[a] < scores[b] || (scores[a] == scores[b] && a < b)
        }
    }

    /// numpy's pairwise summation of float64 values (np.sum on a contiguous array, blocks of 128).
    public static func pairwiseSum(_ v: UnsafeBufferPointer<Double>, _ start: Int, _ count: Int) -> Double {
        if count < 8 {
            var res = 0.0
            for i in 0..<count { res += v[start + i] }
            return res
        }
        if count <= 128 {
            var r = (0..<8).map { v[start + $0] }
            var i = 8
            let whole = count - count % 8
            while i < whole {
                for j in 0..<8 { r[j] += v[start + i + j] }
                i += 8
            }
            var res = ((r[0] + r[1]) + (r[2] + r[3])) + ((r[4] + r[5]) + (r[6] + r[7]))
            while i < count {
                res += v[start + i]
                i += 1
            }
            return res
        }
        var half = count / 2
        half -= half % 8
        return pairwiseSum(v, start, half) + pairwiseSum(v, start + half, count - half)
    }

    /// float64 softmax `exp(x - max) / sum` that tolerates -inf entries (they get 0).
    public static func softmax64(_ scores: [Double]) -> [Double] {
        var top = -Double.infinity
        for x in scores {
            if x.isNaN {
                top = x
                break
            }
            if x > top { top = x }
        }
        precondition(top.isFinite, "cannot sample: the largest logit is \(top)")
        var e = scores.map { Foundation.exp($0 - top) }
        let total = e.withUnsafeBufferPointer { pairwiseSum($0, 0, $0.count) }
        for i in e.indices { e[i] /= total }
        return e
    }

    /// argmax, first index on ties.
    public static func greedy(_ scores: [Float]) -> Int {
        var best = 0
        for i in scores.indices where scores[i] > scores[best] {
            best = i
        }
        return best
    }

    /// One draw by inverse CDF over the non-zero probabilities in index order.
    public static func drawIndex(_ probs: [Double], _ u: Double) -> Int? {
        var ids = [Int]()
        var cdf = [Double]()
        var acc = 0.0
        for (i, p) in probs.enumerated() where p > 0 {
            acc += p
            ids.append(i)
            cdf.append(acc)
        }
        guard let last = cdf.last else { return nil }
        let target = u * last
        var lo = 0
        var hi = cdf.count
        while lo < hi {  // first index with cdf > target (searchsorted side="right")
            let mid = (lo + hi) / 2
            if cdf[mid] > target { hi = mid } else { lo = mid + 1 }
        }
        return ids[min(lo, ids.count - 1)]
    }
}

/// What the generation loop needs from a sampler.
public protocol TokenSampler {
    mutating func next(_ logits: [Float]) throws -> Int
}

/// Turns each step's logits into a token id, remembering the ids seen for the repetition penalty.
public struct Sampler: TokenSampler {
    public let config: SamplingConfig
    private var rng: SplitMix64
    private var seen = Set<Int>()
    public private(set) var seenIds: [Int] = []
    /// The float64 distribution of the last sampled draw (nil before the first or in greedy mode).
    public private(set) var lastProbs: [Double]?
    /// The random() value the last sampled draw used.
    public private(set) var lastUniform: Double?

    public init(config: SamplingConfig, promptIds: [Int] = []) throws {
        let problems = config.problems()
        guard problems.isEmpty else {
            throw CoreError.invalid("bad sampling settings: " + problems.joined(separator: "; "))
        }
        self.config = config
        self.rng = SplitMix64(seed: config.seed)
        for id in promptIds { observe(id) }
    }

    /// The processed scores of a step, without drawing.
    public func process(_ logits: [Float]) -> [Float] {
        var scores = SamplingMath.repetitionPenalty(logits, seen: seenIds, penalty: config.repetitionPenalty)
        if config.greedy { return scores }
        scores = SamplingMath.temperature(scores, config.temperature)
        scores = SamplingMath.topK(scores, config.topK)
        return SamplingMath.topP(scores, config.topP)
    }

    public mutating func next(_ logits: [Float]) throws -> Int {
        guard !logits.isEmpty, !logits.contains(where: { $0.isNaN }) else {
            throw CoreError.invalid("cannot pick a token: the backend returned NaN or no logits")
        }
        let scores = process(logits)
        let token: Int
        if config.greedy {
            token = SamplingMath.greedy(scores)
        } else {
            guard scores.contains(where: { $0.isFinite }) else {
                throw CoreError.invalid("cannot sample: no finite logit")
            }
            let probs = SamplingMath.softmax64(scores.map(Double.init))
            let u = rng.random()
            guard let drawn = SamplingMath.drawIndex(probs, u) else {
                throw CoreError.invalid("cannot sample: no token has a positive probability")
            }
            token = drawn
            lastProbs = probs
            lastUniform = u
        }
        observe(token)
        return token
    }

    /// Counts a token as seen (sampled ones are counted automatically).
    public mutating func observe(_ token: Int) {
        if seen.insert(token).inserted {
            seenIds.append(token)
        }
    }
}
