import Foundation

/// The generation loop, ported from edge_runtime/generation.py (by way of the HarmonyOS app's
/// Generator.ets) so every app runs the loop the Python runtime runs: embeddings with image
/// placeholders replaced by vision features, chunked prefill (last chunk zero-padded), then one
/// decode step per token until a stop id or the limit. A stop token ends generation and is not part
/// of tokenIds (it is reported as stopTokenId).

public enum StopReason: String, Sendable {
    case stopToken = "stop_token"
    case maxNewTokens = "max_new_tokens"
}

public struct GenerationLimits: Sendable {
    public var maxNewTokens: Int
    public var stopIds: [Int]

    public init(maxNewTokens: Int = 64, stopIds: [Int] = []) {
        self.maxNewTokens = maxNewTokens
        self.stopIds = stopIds
    }
}

public struct GenerationResult: Sendable {
    public var tokenIds: [Int] = []
    public var stopReason: StopReason = .maxNewTokens
    public var stopTokenId: Int?
    public var nPromptTokens = 0
    public var prefillMs = 0.0
    public var firstSampleMs = 0.0
    /// Prefill start -> first token sampled (the caller adds preprocessing and vision).
    public var ttftMs = 0.0
    public var decodeMs = 0.0
    /// Decode steps / decode time; 0 when there was no decode step.
    public var decodeTokS = 0.0
    public var stepMs: [Double] = []
    /// Raw logits each token was drawn from (+ the stop token's), when recording was asked for.
    public var logits: [[Float]] = []
}

/// A monotonic clock in milliseconds; injectable so tests and devices use their own.
public typealias Clock = @Sendable () -> Double

public let monotonicMs: Clock = { ProcessInfo.processInfo.systemUptime * 1000 }

public enum Generator {
    /// Fail before any compute when the sequence cannot fit the model's context (Python's message).
    public static func checkContext(_ info: ModelInfo, prompt: Int, new: Int) throws {
        let total = prompt + new
        if total > info.maxContext {
            throw CoreError.invalid(
                "context overflow: prompt of \(prompt) tokens + \(new) new tokens = \(total) > max context "
                    + "\(info.maxContext); shorten the prompt, use fewer or smaller images, or lower max_new_tokens")
        }
    }

    /// Token embeddings of the prompt with the rows holding placeholderId replaced, in order, by the
    /// concatenated features (HF's masked_scatter). The counts must agree exactly.
    public static func spliceEmbeddings(
        _ engine: Engine, promptIds: [Int], features: [[Float]], placeholderId: Int
    ) async throws -> [Float] {
        let hidden = engine.info.hiddenSize
        var embeds = try await engine.tokenEmbedding(promptIds)
        guard embeds.count == promptIds.count * hidden else {
            throw CoreError.invalid(
                "token embedding returned \(embeds.count) values, expected \(promptIds.count) x \(hidden)")
        }
        var featureRows = 0
        for f in features {
            guard f.count % hidden == 0 else {
                throw CoreError.invalid("vision features of \(f.count) values are not rows of \(hidden)")
            }
            featureRows += f.count / hidden
        }
        let rows = promptIds.indices.filter { promptIds[$0] == placeholderId }
        guard rows.count == featureRows else {
            throw CoreError.invalid(
                "the prompt has \(rows.count) image placeholder tokens (id \(placeholderId)) but the image features "
                    + "have \(featureRows) rows; processor and model disagree (downsample mode or slicing?)")
        }
        var next = 0
        for f in features {
            for r in 0..<(f.count / hidden) {
                let dst = rows[next] * hidden
                embeds.replaceSubrange(dst..<(dst + hidden), with: f[(r * hidden)..<((r + 1) * hidden)])
                next += 1
            }
        }
        return embeds
    }

    /// Prefill embeds [T, hidden] in chunks of the engine's chunk size; the last position's logits.
    public static func prefill(_ engine: Engine, embeds: [Float], state: DecoderState) async throws -> [Float] {
        let hidden = engine.info.hiddenSize
        let chunk = engine.info.chunkSize
        let nTokens = embeds.count / hidden
        guard nTokens >= 1, embeds.count % hidden == 0 else {
            throw CoreError.invalid("embeddings must be T >= 1 rows of \(hidden), got \(embeds.count) values")
        }
        try checkContext(engine.info, prompt: nTokens, new: 0)
        var logits = [Float]()
        var begin = 0
        while begin < nTokens {
            let nValid = min(chunk, nTokens - begin)
            var block = [Float](repeating: 0, count: chunk * hidden)  // zero padding past nValid
            block.replaceSubrange(0..<(nValid * hidden), with: embeds[(begin * hidden)..<((begin + nValid) * hidden)])
            logits = try await engine.prefillChunk(embeds: block, nValid: nValid, startPos: begin, state: state)
            begin += chunk
        }
        return logits
    }

    /// prefill -> first token -> (feed token i at position T+i -> sample) until a stop id or the
    /// limit. onToken sees each output token as it comes (a StreamDecoder, the UI); its time is not
    /// counted in the decode steps.
    public static func generate<S: TokenSampler>(
        _ engine: Engine, embeds: [Float], sampler: inout S, limits: GenerationLimits,
        recordLogits: Bool = false, clock: Clock = monotonicMs, onToken: (Int) -> Void = { _ in }
    ) async throws -> GenerationResult {
        let nPrompt = embeds.count / engine.info.hiddenSize
        try checkContext(engine.info, prompt: nPrompt, new: limits.maxNewTokens)
        var out = GenerationResult()
        out.nPromptTokens = nPrompt
        let stops = Set(limits.stopIds)
        let state = try engine.newState()

        let tStart = clock()
        var logits = try await prefill(engine, embeds: embeds, state: state)
        out.prefillMs = clock() - tStart
        var token = try sampler.next(logits)
        out.ttftMs = clock() - tStart
        out.firstSampleMs = out.ttftMs - out.prefillMs

        while true {
            if recordLogits {
                out.logits.append(logits)
            }
            if stops.contains(token) {
                out.stopReason = .stopToken
                out.stopTokenId = token
                break
            }
            out.tokenIds.append(token)
            onToken(token)
            if out.tokenIds.count == limits.maxNewTokens {
                out.stopReason = .maxNewTokens
                break
            }
            let t0 = clock()
            let embed = try await engine.tokenEmbedding([token])
            logits = try await engine.decodeStep(embed: embed, pos: nPrompt + out.tokenIds.count - 1, state: state)
            token = try sampler.next(logits)
            out.stepMs.append(clock() - t0)
        }
        out.decodeMs = out.stepMs.reduce(0, +)
        if !out.stepMs.isEmpty && out.decodeMs > 0 {
            out.decodeTokS = Double(out.stepMs.count) / (out.decodeMs / 1000)
        }
        return out
    }
}
